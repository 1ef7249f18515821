"""Task-transfer diagnostics: how alike the tasks' gradients on the shared encoder are.

At each evaluation after step 0, each task's latest training micro-batch (kept as it went by)
goes through the model once more, and the gradient of its loss on the encoder's transformer
layers is taken — not the embeddings, whose gradient is a sparse, task-specific set of token
rows. Each gradient is compressed to a count sketch of SKETCH numbers (a fixed random bucket and
sign per weight), whose inner products estimate the full gradients' within about
1/sqrt(SKETCH); the cosine similarities of all task pairs go to `metrics.jsonl` (kind
"transfer") and are drawn as `gradient_similarity.png` in the run directory.

Cost: one forward and backward pass per task and evaluation, spread over the workers (each
task on the lowest-ranked worker that has a micro-batch of it); the training itself is
untouched (no dropout, `autograd.grad` leaves the accumulated gradients alone). Not under ZeRO-3,
whose workers hold only a shard of each weight.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.distributed as dist

from muppet_ray import batch as mb

SKETCH = 2**16


class GradientSimilarity:
    def __init__(self, model: torch.nn.Module, num_tasks: int, seed: int = 0):
        encoder = model.backbone.get_encoder() if model.encoder_decoder else model.backbone
        self.params = [p for name, p in encoder.named_parameters()
                       if p.requires_grad and "embed" not in name]
        self.num_tasks = num_tasks
        generator = torch.Generator().manual_seed(seed)
        # (int32 buckets: half the memory of int64 for a weight's worth of indices)
        self.buckets = [torch.randint(0, SKETCH, (p.numel(),), generator=generator,
                                      dtype=torch.int32) for p in self.params]
        self.signs = [torch.randint(0, 2, (p.numel(),), generator=generator,
                                    dtype=torch.int8) * 2 - 1 for p in self.params]
        self.latest: dict[int, mb.Batch] = {}  # task -> its latest training micro-batch here

    def remember(self, batch: mb.Batch) -> None:
        tasks = np.unique(batch["example_task"])
        if len(tasks) == 1:  # (single-task micro-batches only: a task's own gradient)
            self.latest[int(tasks[0])] = batch

    def similarities(self, model: torch.nn.Module, device: torch.device, rank: int,
                     world: int) -> tuple[list[int], np.ndarray] | None:
        """(the tasks measured, their cosine similarity matrix), on every worker; None when
        fewer than two tasks were trained since the last call."""
        have = torch.zeros(world, self.num_tasks, dtype=torch.float64, device=device)
        have[rank, list(self.latest)] = 1
        if world > 1:
            dist.all_reduce(have)
        owner = [int(have[:, t].nonzero()[0]) if have[:, t].any() else -1
                 for t in range(self.num_tasks)]
        sketches = torch.zeros(self.num_tasks, SKETCH, dtype=torch.float64)
        was_training = model.training
        model.eval()  # (no dropout: the same weights' gradient, and no random draws taken)
        with torch.enable_grad():
            for task, batch in self.latest.items():
                if owner[task] == rank:
                    sketches[task] = self.sketch(model, batch, device)
        model.train(was_training)
        self.latest = {}
        sketches = sketches.to(device)
        if world > 1:
            dist.all_reduce(sketches)
        measured = [t for t in range(self.num_tasks) if owner[t] >= 0]
        if len(measured) < 2:
            return None
        vectors = sketches[measured].cpu()
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return measured, (vectors @ vectors.T).numpy()

    def sketch(self, model: torch.nn.Module, batch: mb.Batch, device: torch.device
               ) -> torch.Tensor:
        piece = mb.select(batch, np.arange(min(mb.num_examples(batch), 16)))
        loss = model(mb.to_torch(piece, device))["loss"]
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        out = torch.zeros(SKETCH, dtype=torch.float64)
        for grad, buckets, signs in zip(grads, self.buckets, self.signs):
            if grad is not None:
                out.index_add_(0, buckets, grad.detach().flatten().double().cpu() * signs)
        return out


def heat_map(names: list[str], cosine: np.ndarray, step: int) -> bytes:
    """The task x task similarity matrix as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2 + 0.28 * len(names)
    figure, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"cosine similarity of task gradients on the encoder, step {step}",
                 fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()
