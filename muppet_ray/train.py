"""The per-worker training function that Ray Train runs on every worker.

One optimizer step = N micro-batches (N = grad_accum_steps x max workers), shared by the W
workers that run now, N / W each (the largest spread over the workers); each worker adds up the
gradients of its share and DeepSpeed averages them over the workers once per step, so with
heterogeneous batching every update mixes N single-task micro-batches. A micro-batch larger than
`batching.max_tokens_per_pass` goes through the model in several passes (step.py), which bounds
activation memory without changing the update.
Steps, evaluations, checkpoints and reports happen at the same points on every worker (Ray Train
and DeepSpeed both need that).

Elastic training: a run restarted with another worker count trains on the same micro-batches in
the same steps (the schedule depends on N, not W). DeepSpeed's ZeRO checkpoint is sharded by
worker, so it is first turned into a universal checkpoint (DeepSpeed's own format for loading
under another world size), which each worker reshards as it loads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from muppet_ray import batch as mb
from muppet_ray import checkpoint as checkpoints
from muppet_ray import data, runtime
from muppet_ray.config import Config, micro_batches_per_step
from muppet_ray.errors import ConfigError
from muppet_ray.export import write_export
from muppet_ray.faults import FaultInjection
from muppet_ray.metrics import (
    MetricsLogger,
    Window,
    peak_resident_mb,
    progress_line,
    ranges,
    resident_mb,
)
from muppet_ray.mixture import Schedule, build_schedule
from muppet_ray.model import MuppetModel, build_backbone, hidden_size
from muppet_ray.optim import (
    activation_memory,
    build_optimizer,
    choose_zero_stage,
    deepspeed_config,
)
from muppet_ray.step import forward_backward, passes, uses_bf16
from muppet_ray.storage import RunDir
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import HeadLayout
from muppet_ray.transfer import GradientSimilarity, heat_map

# Worker output goes through a logger: Ray Train forwards it to the driver once (its patched
# `print` would show every line twice).
log = logging.getLogger("muppet_ray")


@dataclass(frozen=True)
class WorkerPlan:
    """What the driver hands every worker."""

    config: Config  # (variables expanded: the workers' environment may lack them)
    config_yaml: str  # the config as the run saved it (`${VAR}` kept), for the export
    run_dir: str  # URI
    tokenizer: Any
    layouts: list[HeadLayout]  # each task's head layout, in the run's order
    train_caches: list[data.CacheIndex | None]  # per task (None: evaluation only)
    eval_caches: list[data.CacheIndex]
    initial_heads: dict  # fine-tuning: trained head tensors, keyed as in `MuppetModel.heads`
    evaluate_only: bool = False  # score the starting model, no training


class Trainer:
    """One training worker: `run` is the whole training (`resume`, then `train`). Its parts:"""

    config: Config
    run_dir: RunDir
    engine: Any  # DeepSpeed's engine: the model, its optimizer and ZeRO (`build`)
    schedule: Schedule  # every micro-batch of the run, step by step (mixture.py)
    positions: np.ndarray  # [steps, micro-batches]: this worker's share of the schedule
    logger: MetricsLogger | None  # metrics.jsonl and TensorBoard (rank 0)
    similarity: GradientSimilarity | None  # task-transfer diagnostics (transfer.py)
    fault: FaultInjection | None  # tests only: run.fail_at_step, fail_node_at_step (faults.py)

    def __init__(self, plan: WorkerPlan):
        self.config = plan.config
        self.config_yaml = plan.config_yaml
        self.run_dir = RunDir(plan.run_dir)
        self.tokenizer = plan.tokenizer
        self.layouts = plan.layouts
        self.train_caches = plan.train_caches
        self.eval_caches = plan.eval_caches
        self.initial_heads = plan.initial_heads
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.per_step = micro_batches_per_step(self.config)
        self.accum = self.per_step // self.world  # (config.py checks that it divides)
        self.logger = MetricsLogger(self.run_dir) if self.rank == 0 else None
        self.similarity: GradientSimilarity | None = None  # (set by `run`)
        self.transfer_after = 0  # the step after which the next transfer record measures
        # Tests only (run.fail_at_step, run.fail_node_at_step): kills a worker or a node.
        self.fault = (FaultInjection(self.config, self.run_dir, self.rank, self.world)
                      if self.config.run.fail_at_step or self.config.run.fail_node_at_step
                      else None)
        if self.device.type == "cpu":
            # One compute thread per CPU Ray gave the worker: torch would otherwise start one per
            # core in every worker, and workers sharing a machine then fight over its cores.
            torch.set_num_threads(max(1, int(self.config.scaling.cpus_per_worker)))

    # ------------------------------------------------------------------ setup

    def build(self, load_universal: bool = False, saved_stage: int | None = None) -> None:
        """The model in DeepSpeed's engine. `saved_stage`: the ZeRO stage of the checkpoint to
        be loaded (a resumed run keeps it)."""
        on_gpu = self.device.type == "cuda"
        runtime.use_deepspeed_accelerator(on_gpu)
        import deepspeed  # after DS_ACCELERATOR: it picks its accelerator at import

        self.deepspeed = deepspeed
        bf16 = uses_bf16(self.config, self.device)
        torch.manual_seed(self.config.training.seed)  # identical initial weights everywhere
        model = MuppetModel(
            build_backbone(self.config.model, self.tokenizer), self.layouts,
            self.config.model.dropout, self.config.training.loss_scaling,
            self.config.model.max_target_length, self.tokenizer,
        )
        if self.initial_heads:
            # strict: every tensor handed over must land (a wrong name would silently be lost)
            missing = set(self.initial_heads) - set(model.heads.state_dict())
            if missing:
                raise RuntimeError(f"initial heads {sorted(missing)} are not heads of the model")
            model.heads.load_state_dict(self.initial_heads, strict=False)
        if self.config.training.compile:
            model.backbone.compile(dynamic=True)  # (every micro-batch has its own shape)
        self.zero_stage = self.choose_zero_stage(model, bf16, saved_stage)
        optimizer, scheduler = build_optimizer(model, self.config, fused=on_gpu)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, self.world, bf16, self.zero_stage,
                                    load_universal),
        )
        if self.zero_stage and not runtime.reduces_once_per_step(self.engine.optimizer):
            raise ConfigError(
                f"deepspeed.config: DeepSpeed wraps the optimizer in "
                f"{type(self.engine.optimizer).__name__}, which cannot reduce gradients once per "
                "step (remove data_types.grad_accum_dtype, or use another zero_stage)")

    def choose_zero_stage(self, model: torch.nn.Module, bf16: bool, saved: int | None) -> int:
        """deepspeed.zero_stage, or for `auto` the checkpoint's stage, or the stage that fits the
        smallest worker's memory (optim.choose_zero_stage), said once."""
        stage = self.config.deepspeed.zero_stage
        if stage != "auto":
            return stage
        if saved is not None:
            return saved
        if self.device.type == "cuda":
            memory = torch.cuda.get_device_properties(self.device).total_memory
        else:  # (the node's memory, shared by the workers on it)
            memory = psutil.virtual_memory().total // ray.train.get_context().get_local_world_size()
        memory = int(self._all_reduce(torch.tensor([float(memory)], dtype=torch.float64),
                                      op=dist.ReduceOp.MIN).item())
        backbone = model.backbone.config
        layers = (getattr(backbone, "num_hidden_layers", 0) if not backbone.is_encoder_decoder
                  else backbone.encoder_layers + backbone.decoder_layers)
        batching = self.config.batching
        tokens = batching.max_tokens_per_pass or (batching.micro_batch_size
                                                  * self.config.model.max_length)
        stage, reason = choose_zero_stage(
            sum(p.numel() for p in model.parameters()), self.world, memory, bf16,
            activation_memory(tokens, layers, hidden_size(model.backbone), bf16))
        if self.rank == 0:
            log.info(f"[muppet-ray] deepspeed.zero_stage auto: ZeRO-{stage} ({reason})")
        return stage

    def fetch_checkpoint(self, latest: ray.train.Checkpoint, local: str
                         ) -> tuple[str, bool, dict] | None:
        """Fetch into `local` the newest registered checkpoint up to `latest` whose files verify
        on every worker (each fetches and checks the files it loads); returns its name, whether
        it is resharded (written by another number of workers: then fetched as DeepSpeed's
        universal checkpoint) and its saved state, or None if none is intact."""
        fs, (parent, newest) = latest.filesystem, latest.path.rsplit("/", 1)
        names = [None]
        if self.rank == 0:  # (rank 0 reads Ray Train's record; all take its list)
            names = [[n for n in self.run_dir.registered_checkpoints() if n <= newest]
                     or [newest]]
        if self.world > 1:
            dist.broadcast_object_list(names, src=0)
        for name in reversed(names[0]):
            path = f"{parent}/{name}"
            state = checkpoints.saved_state(fs, path)
            saved = checkpoints.world_size_in(state)
            # (ZeRO-0 keeps no shards; `auto` is always 2 or 3)
            reshard = self.config.deepspeed.zero_stage != 0 and saved not in (None, self.world)
            shutil.rmtree(local, ignore_errors=True)
            problem = (checkpoints.fetch_universal(fs, path, local, self.rank) if reshard
                       else checkpoints.fetch(fs, path, local, self.rank))
            if problem and (self.rank == 0 or not reshard):
                log.warning(f"[muppet-ray] {name} is damaged ({problem}): not resuming from it")
            if not self._all_reduce(torch.tensor([float(bool(problem))]),
                                    op=dist.ReduceOp.MAX).item():
                if self.rank == 0 and name != newest:
                    log.warning(f"[muppet-ray] resuming from {name}, the newest intact "
                                "checkpoint")
                if self.rank == 0 and reshard:
                    log.warning(f"[muppet-ray] resuming with {self.world} workers from a "
                                f"checkpoint of {saved}: each now runs {self.accum} of the "
                                f"step's {self.per_step} micro-batches")
                return name, reshard, state
        return None

    # --------------------------------------------------------------- training

    def run_evaluation(self) -> None:
        """`muppet-ray evaluate`: the validation metrics of the starting model, no training."""
        self.build()
        metrics = self.evaluate(0)
        ray.train.report({"step": 0, **_flatten(metrics)})
        if self.logger:
            self.logger.close()

    def run(self) -> None:
        start = self.resume()
        if start is not None:
            self.train(start)

    def resume(self) -> int | None:
        """Build the engine, load the newest intact checkpoint and lay out this worker's
        micro-batches; returns the steps already done (None: nothing to resume from)."""
        latest = ray.train.get_checkpoint()
        with tempfile.TemporaryDirectory(prefix="muppet-resume-") as local:
            found = self.fetch_checkpoint(latest, local) if latest is not None else None
            self.build(load_universal=bool(found and found[1]),
                       saved_stage=checkpoints.zero_stage_in(found[2]) if found else None)
            if latest is not None and found is None:
                self.stop(0, f"no checkpoint of {self.run_dir.root!r} is intact (each failed "
                          "its manifest, see the warnings above); remove the damaged ones or "
                          "start a new run")
                return None
            self.lay_out()
            return checkpoints.load(self.engine, local) if found else 0

    def lay_out(self) -> None:
        """The run's schedule, and this worker's share of it."""
        self.schedule = build_schedule(
            [c.chunks for c in self.train_caches], [c.examples for c in self.train_caches],
            self.config.mixture, self.config.batching, self.per_step,
            self.config.training.max_steps, self.config.training.seed,
            [t.name for t in self.layouts],
        )
        # Each worker's micro-batches, a row per step: the step's largest go to different
        # workers (Schedule.worker_positions), so that no worker waits long for another.
        cost = data.position_costs(self.schedule, self.train_caches)
        every = np.stack([self.schedule.worker_positions(rank, self.world, cost=cost)
                          for rank in range(self.world)]).reshape(self.world, -1, self.accum)
        self.positions = every[self.rank]
        # What each micro-batch's number of passes is based on: its own size, or under ZeRO-3
        # (whose passes gather parameters from all workers) the largest of the same micro-step.
        self.pass_cost = cost[every].max(axis=0) if self.zero3 else cost[self.positions]
        self.similarity = (GradientSimilarity(self.engine.module, len(self.layouts), self.device)
                           if len(self.layouts) > 1 else None)

    def train(self, start: int) -> None:
        """The training loop, from step `start`: steps, logs, evaluations, checkpoints, and at
        the end the final evaluation, checkpoint and export."""
        steps = self.config.training.max_steps
        stream = data.stream(self.schedule, self.positions[start:].ravel(), self.train_caches,
                             self.tokenizer.pad_token_id)
        if start == 0:
            self.evaluate(0)
        self.transfer_after = start
        train = self.config.training
        window = Window(len(self.layouts))
        if start % train.log_every:
            # Resumed inside a logging window: its steps up to the checkpoint were trained before
            # it, and the record that now closes the window replaces the earlier one, so it lists
            # their positions too (its loss and rates cover the steps trained now).
            first = start // train.log_every * train.log_every
            window.positions = list(range(first * self.per_step, start * self.per_step))
        bad_in_a_row = 0
        for step in range(start, steps):
            if self.fault:
                self.fault.before_step(step)
            applied = self.train_step(step, stream, window)
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            if bad_in_a_row > train.max_bad_steps:
                self.stop(step + 1, f"{bad_in_a_row} steps in a row (the last {step + 1}) had a "
                          "non-finite loss or gradients, more than training.max_bad_steps "
                          f"({train.max_bad_steps}); no checkpoint or export was written after "
                          "them (lower training.learning_rate, or check the tasks' data)")
                return
            done = step + 1
            if done % train.log_every == 0 or done == steps:
                self.log_train(done, window)
                window = Window(len(self.layouts))
            paused = time.perf_counter()
            if train.eval_every and done % train.eval_every == 0 and done != steps:
                metrics = self.evaluate(done)
                self.log_transfer(done)
                # (to Ray Tune, through TuneReportCallback: what ASHA stops trials on)
                ray.train.report({"step": done, **_flatten(metrics)})
            if done % train.checkpoint_every == 0 and done != steps:
                if not self.weights_finite(done):
                    return
                self.checkpoint(done, {"step": done})
            window.start += time.perf_counter() - paused  # (rates count training time only)
        if not self.weights_finite(steps):
            return
        final = self.evaluate(steps)
        self.log_transfer(steps)
        if start < steps:  # (a restart after the final checkpoint only re-exports)
            self.checkpoint(steps, {"step": steps, **_flatten(final)})
        export = self.export(steps)
        ray.train.report({"step": steps, "export": export or "", **_flatten(final)})
        if self.logger:
            self.logger.close()

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    def passes(self, batch: mb.Batch, cost: int) -> list[tuple[mb.Batch, float]]:
        """The micro-batch's passes (step.passes); under ZeRO-3 as many on every worker."""
        return passes(batch, cost, self.config.batching.max_tokens_per_pass, self.zero3)

    def train_step(self, step: int, stream, window: Window) -> bool:
        """One optimizer step; False if it was skipped (a non-finite loss or gradients)."""
        num_tasks = len(self.layouts)
        # Loss sums stay on the device; one transfer per step (not per micro-batch) keeps the
        # accelerator's queue full.
        sums = {name: torch.zeros(size, dtype=torch.float64, device=self.device) for name, size
                in (("loss", 1), ("task_loss", num_tasks), ("task_examples", num_tasks))}
        tokens = torch.zeros(2, dtype=torch.float64)  # real, padded
        slots = torch.zeros(self.per_step, dtype=torch.float64)  # the step's positions
        first = step * self.per_step
        with one_reduction(self.engine, self.zero_stage):
            for micro in range(self.accum):
                waiting = time.perf_counter()
                row = next(stream)
                window.data_wait += time.perf_counter() - waiting
                position = int(row["position"])
                if position != self.positions[step, micro]:
                    raise RuntimeError(
                        f"worker {self.rank} got micro-batch {position} at step {step}")
                batch = mb.from_bytes(row["payload"])
                with (self.similarity.measuring(batch) if self.similarity
                      else contextlib.nullcontext()):
                    # the step's loss: the mean over its micro-batches of each one's mean
                    forward_backward(self.engine, self.passes(batch, self.pass_cost[step, micro]),
                                     1 / self.accum, self.device, sums)
                tokens += torch.tensor([int(row["num_tokens"]), int(row["padded_tokens"])])
                slots[position - first] = position  # every slot of the step filled once
        # (every worker then has the same totals, so all take the same decision)
        totals = self._sum_over_workers({**sums, "tokens": tokens, "positions": slots})
        loss, task_loss = totals["loss"].item(), totals["task_loss"].numpy()
        positions = [int(p) for p in totals["positions"]]
        finite = math.isfinite(loss)
        if finite or self.zero_stage:
            # ZeRO's optimizers skip a step whose gradient norm is not finite by themselves
            # (weights, moments and learning-rate schedule untouched); ZeRO-0's does not.
            self.engine.step()
        else:
            self.engine.optimizer.zero_grad(set_to_none=True)
        if not (finite and self.engine.was_step_applied()):
            self.log_skipped(step + 1, [t.name for t, value in zip(self.layouts, task_loss)
                                        if not math.isfinite(value)], positions)
            return False
        window.add(loss / self.per_step, task_loss, totals["task_examples"].numpy(),
                   *totals["tokens"].tolist(), positions)
        return True

    def _sum_over_workers(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each part summed over the workers, in one all-reduce; on the CPU."""
        total = self._all_reduce(torch.cat([p.to(self.device).double() for p in parts.values()]))
        return dict(zip(parts, total.split([p.numel() for p in parts.values()])))

    def _all_reduce(self, values: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) over workers; returns the result on the CPU."""
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
        return values.cpu()

    # ------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, dict[str, float]]:
        """Validation metrics of every task, computed across all workers, and logged. Batches
        are read as they are needed: keeping them would hold every validation split in each
        worker."""
        began = time.perf_counter()
        self.engine.eval()
        stats, pairs = None, {}
        generating = [t.type == "generation" for t in self.layouts]
        for task, chunk, counted, turn_cost in data.eval_chunks(
                self.eval_caches, self.rank, self.world, generating):
            batch = data.ChunkReader.read(self.eval_caches[task], chunk, task)
            own_cost = batch["attention_mask"].size
            for piece, share in self.passes(batch, turn_cost if self.zero3 else own_cost):
                # (the module's own method: DeepSpeed's hooks on its submodules still gather
                # ZeRO-3's parameters)
                values = self.engine.module.evaluate(mb.to_torch(piece, self.device))
                values = values.double().cpu() * (counted and share > 0)
                stats = values if stats is None else stats + values
                taken = self.engine.module.take_pairs()
                for task, found in taken.items() if counted and share > 0 else ():
                    pairs.setdefault(task, []).append(found)
        self.engine.train()
        stats = self._all_reduce(stats).numpy()
        if any(TASK_TYPES[t.type].keeps_pairs for t in self.layouts) and self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, pairs)
            pairs = {task: [p for mine in every for p in mine.get(task, [])]
                     for task in range(len(self.layouts))}
        metrics = {t.name: TASK_TYPES[t.type].finalize(
            stats[i], np.concatenate(pairs[i]) if pairs.get(i) else None)
            for i, t in enumerate(self.layouts)}
        self.log_eval(step, metrics, time.perf_counter() - began)
        return metrics

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, metrics: dict) -> None:
        """DeepSpeed's sharded checkpoint, each worker's shards merged by Ray Train."""
        if self.logger:
            self.logger.flush()
        # Rank 0 names the checkpoint (after those in the run directory) and every worker takes
        # its name; each says on which node it writes its shards.
        mine = (ray.get_runtime_context().get_node_id(),
                checkpoints.dir_name(step, set(self.run_dir.list(""))) if self.rank == 0
                else None)
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        nodes, name = [node for node, _ in every], every[0][1]
        with tempfile.TemporaryDirectory(prefix="muppet-ckpt-") as directory:
            checkpoints.save(self.engine, directory, step, self.rank, self.world, nodes,
                             self.zero_stage)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name,
                             checkpoint_upload_fn=self.fault and self.fault.upload_fn(step))

    def export(self, step: int) -> str | None:
        module = self.engine.module
        # ZeRO-3 holds a shard of each parameter per worker: gather them (a no-op otherwise).
        with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                return write_export(module, self.tokenizer, self.run_dir, step, self.config_yaml)
        return None

    # ---------------------------------------------------------------- logging

    def log_train(self, step: int, window: Window) -> None:
        # (on every worker: the data wait and memory figures are the largest over workers)
        worst = self._all_reduce(torch.tensor(
            [window.data_wait, resident_mb(), peak_resident_mb(), self._gpu_peak_mb()],
            dtype=torch.float64), op=dist.ReduceOp.MAX).tolist()
        if not self.logger or not window.steps:
            return
        on_gpu = self.device.type == "cuda"
        record = window.record(step, self.engine.get_lr()[0], self.world,
                               [t.name for t in self.layouts], *worst[:3],
                               gpu_peak_mb=worst[3] if on_gpu else None)
        self.logger.log(record)
        line = progress_line(record, window, self.config.training.max_steps,
                             self.config.training.log_every)
        if line:
            log.info(line)

    def log_transfer(self, step: int) -> None:
        """The tasks' gradient similarities (transfer.py), logged and drawn by rank 0."""
        if self.similarity is None:
            return
        found = self.similarity.similarities(self.world)
        after, self.transfer_after = self.transfer_after, step
        if found is None or not self.logger:
            return
        tasks, cosine = found
        names = [self.layouts[t].name for t in tasks]
        self.logger.log({"kind": "transfer", "step": step, "after_step": after, "tasks": names,
                         "cosine": np.round(cosine, 4).tolist()})
        self.run_dir.write_bytes("gradient_similarity.png",
                                 heat_map(names, cosine, after, step))

    def log_skipped(self, step: int, tasks: list[str], positions: list[int]) -> None:
        if not self.logger:
            return
        # (the positions keep the audit whole: every micro-batch is in a train or skip record)
        self.logger.log({"kind": "skipped", "step": step, "tasks": tasks,
                         "positions": ranges(sorted(positions))})
        log.warning(f"[muppet-ray] step {step} skipped: non-finite loss or gradients "
                    f"(tasks {tasks or 'unknown: the loss was finite'})")

    def weights_finite(self, step: int) -> bool:
        """Whether every weight is finite on every worker (else the run stops: no checkpoint or
        export ever holds a non-finite weight). Under ZeRO-3 each checks its own shards."""
        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())
                    for p in self.engine.module.parameters())
        bad = self._all_reduce(torch.tensor([0.0 if local else 1.0]), op=dist.ReduceOp.MAX)
        if bad.item():
            self.stop(step, f"weights became non-finite by step {step}; nothing was saved from "
                      "then on (lower training.learning_rate, or check the tasks' data)")
        return not bad.item()

    def stop(self, step: int, reason: str) -> None:
        """End the run on every worker (they all decide at the same step); the driver raises
        `reason` as a TrainingError."""
        if self.logger:
            self.logger.log({"kind": "stopped", "step": step, "reason": reason})
            self.logger.close()

    def _gpu_peak_mb(self) -> float:
        on_gpu = self.device.type == "cuda"
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if on_gpu else 0.0

    def log_eval(self, step: int, metrics: dict[str, dict[str, float]], seconds: float) -> None:
        if not self.logger:
            return
        self.logger.log({"kind": "eval", "step": step, "seconds": seconds, "metrics": metrics})
        self.logger.flush()
        summary = "  ".join(
            f"{task} {next(iter(values.values())):.3f}" for task, values in metrics.items())
        log.info(f"[muppet-ray] eval @ step {step}: {summary}")


@contextlib.contextmanager
def one_reduction(engine, zero_stage: int):
    """Backward passes inside add up their gradients on each worker; DeepSpeed averages them over
    the workers once, on leaving (left to itself, ZeRO-2 reduces at every backward)."""
    if zero_stage == 0:
        with engine.no_sync():
            yield
        engine.allreduce_gradients()
    else:
        with engine.coalesce_grad_reduction():
            yield


def _flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{name}": value for task, values in metrics.items()
            for name, value in values.items() if math.isfinite(value)}


def train_loop_per_worker(plan: WorkerPlan) -> None:
    """Ray Train's per-worker function (the launcher binds the plan: prefinetune.launch)."""
    log.setLevel(logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = Trainer(plan)
    trainer.run_evaluation() if plan.evaluate_only else trainer.run()
