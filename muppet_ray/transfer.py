"""Task-transfer diagnostics: how alike the tasks' gradients on the shared encoder are.

Between two evaluations, the first single-task micro-batch of each task that a worker trains on
is measured as it trains: hooks on the encoder's transformer layers (not the embeddings, whose
gradient is a sparse, task-specific set of token rows) add that backward pass's gradient to the
task's count sketch of SKETCH numbers (each weight hashed to a bucket and a sign), whose inner
products estimate the full gradients' within about 1/sqrt(SKETCH). At the evaluation the
workers' sketches are summed and the cosine similarities of all task pairs go to
`metrics.jsonl` (kind "transfer"), drawn as `gradient_similarity.png` in the run directory.

Cost: one sketch per task, worker and evaluation interval, and no pass of its own. It works
under every ZeRO stage: a weight's hook sees its whole gradient of the pass before DeepSpeed
reduces it (ZeRO-3 gathers the weight for the pass), and the bucket and sign of each weight
are hashed from its index rather than stored (stored, they would cost every worker 5 bytes a
weight: more than ZeRO-3 saves).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from muppet_ray import batch as mb
from muppet_ray.callbacks import Callback
from muppet_ray.metrics import RunMetrics
from muppet_ray.workers import Workers

SKETCH = 2**16


class TransferSketch(Callback):
    """The training loop's hook for the diagnostics: sketches as micro-batches train, and the
    similarities logged and drawn at each evaluation."""

    def __init__(self, model: torch.nn.Module, tasks: list[str], workers: Workers,
                 metrics: RunMetrics, start: int):
        self.similarity = GradientSimilarity(model, len(tasks), workers.device)
        self.tasks, self.workers, self.metrics = tasks, workers, metrics
        self.after = start  # the step after which the next record measures

    def micro_batch(self, batch: mb.Batch):
        return self.similarity.measuring(batch)

    def after_evaluation(self, step: int) -> None:
        found = self.similarity.similarities(self.workers.world)
        after, self.after = self.after, step
        if found is None:
            return
        measured, cosine = found
        names = [self.tasks[t] for t in measured]
        self.metrics.log({"kind": "transfer", "step": step, "after_step": after,
                          "tasks": names, "cosine": np.round(cosine, 4).tolist()})
        if self.workers.rank == 0:  # (drawing costs a second)
            self.metrics.write_figure("gradient_similarity.png",
                                      heat_map(names, cosine, after, step))


class GradientSimilarity:
    def __init__(self, model: torch.nn.Module, num_tasks: int, device: torch.device,
                 seed: int = 0):
        encoder = model.backbone.get_encoder() if model.encoder_decoder else model.backbone
        self.num_tasks = num_tasks
        self.seed = seed
        self.sketches = torch.zeros(num_tasks, SKETCH, dtype=torch.float64, device=device)
        self.measured: set[int] = set()  # tasks sketched here since the last `similarities`
        self.task: int | None = None  # the task whose backward passes are being sketched
        offset = 0
        for name, p in encoder.named_parameters():
            if p.requires_grad and "embed" not in name:
                p.register_hook(self._hook(offset))
                offset += getattr(p, "ds_numel", p.numel())  # (ZeRO-3: p holds a shard)

    @contextlib.contextmanager
    def measuring(self, batch: mb.Batch):
        """Around a micro-batch's backward passes: sketch them if it is the first single-task
        micro-batch of its task since the last call of `similarities` (on this worker)."""
        tasks = np.unique(batch["example_task"])
        if len(tasks) != 1 or int(tasks[0]) in self.measured:
            yield
            return
        self.task = int(tasks[0])
        try:
            yield
        finally:
            self.measured.add(self.task)
            self.task = None

    def _hook(self, offset: int):
        def add(grad: torch.Tensor) -> None:
            if self.task is not None:
                buckets, signs = hashed(offset, grad.numel(), self.seed, grad.device)
                self.sketches[self.task].index_add_(0, buckets, grad.flatten().double() * signs)
        return add

    def similarities(self, world: int) -> tuple[list[int], np.ndarray] | None:
        """(the tasks measured on any worker, their cosine similarity matrix), on every worker
        (a collective call); None when fewer than two tasks were measured since the last call."""
        seen = torch.zeros(self.num_tasks, dtype=torch.float64, device=self.sketches.device)
        seen[sorted(self.measured)] = 1
        if world > 1:
            dist.all_reduce(self.sketches)
            dist.all_reduce(seen)
        measured = [t for t in range(self.num_tasks) if seen[t]]
        vectors = self.sketches[measured].cpu()
        self.sketches.zero_()
        self.measured = set()
        if len(measured) < 2:
            return None
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return measured, (vectors @ vectors.T).numpy()


def hashed(offset: int, count: int, seed: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The buckets and signs of weights offset .. offset + count: splitmix64 of their index."""
    x = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    x = x + (seed + 1) * -7046029254386353131  # (0x9E3779B97F4A7C15; int64 arithmetic wraps)
    x = (x ^ _shift(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ _shift(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    x = x ^ _shift(x, 31)
    buckets = x & (SKETCH - 1)
    signs = (_shift(x, 32) & 1).double() * 2 - 1
    return buckets, signs


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as on unsigned integers (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def heat_map(names: list[str], cosine: np.ndarray, after: int, step: int) -> bytes:
    """The task x task similarity matrix as a PNG."""
    from muppet_ray.plots import png, pyplot

    size = 2 + 0.28 * len(names)
    figure, ax = pyplot().subplots(figsize=(size + 1.5, size))
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"cosine similarity of task gradients on the encoder:\neach task's first "
                 f"micro-batch after step {after} (logged at step {step})",
                 fontsize=9)  # (two lines: one was cut off at the figure's edge below ~20 tasks)
    figure.colorbar(image, ax=ax, shrink=0.8)
    return png(figure)
