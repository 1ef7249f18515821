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
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch

from muppet_ray import batch as mb
from muppet_ray import data, runtime
from muppet_ray.callbacks import Callback
from muppet_ray.checkpoint import Checkpointer
from muppet_ray.config import Config, micro_batches_per_step
from muppet_ray.engine import build_engine
from muppet_ray.errors import RunStopped
from muppet_ray.evaluation import Evaluator
from muppet_ray.export import export_from_engine
from muppet_ray.faults import FaultInjection
from muppet_ray.metrics import RunMetrics, Window, peak_resident_mb, progress_line, resident_mb
from muppet_ray.schedule import WorkerSchedule
from muppet_ray.step import forward_backward, passes
from muppet_ray.storage import RunDir
from muppet_ray.tasks import HeadLayout
from muppet_ray.transfer import TransferSketch
from muppet_ray.workers import Workers

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
    """One training worker: `__init__` builds (or restores) its components, `train` is the
    loop."""

    config: Config
    workers: Workers  # this worker's rank, the world, its device; collectives (workers.py)
    metrics: RunMetrics  # metrics.jsonl, TensorBoard, console lines: worker 0's (metrics.py)
    checkpointer: Checkpointer  # find, verify, reshard, restore, save (checkpoint.py)
    engine: Any  # DeepSpeed's engine: model, optimizer, learning-rate schedule (engine.py)
    zero_stage: int
    kept: dict  # what checkpoints keep beside the model: the step, the step-0 metrics
    evaluator: Evaluator  # validation metrics across the workers (evaluation.py)
    schedule: WorkerSchedule  # this worker's micro-batches, step by step (schedule.py)
    callbacks: list[Callback]  # diagnostics and tests' fault injection (callbacks.py)

    def __init__(self, plan: WorkerPlan, workers: Workers, metrics: RunMetrics):
        self.config, self.workers, self.metrics = plan.config, workers, metrics
        self.plan, self.run_dir = plan, RunDir(plan.run_dir)
        self.per_step = micro_batches_per_step(self.config)
        self.accum = self.per_step // workers.world  # (config.py checks that it divides)
        self.checkpointer = Checkpointer(self.run_dir, workers,
                                         self.config.deepspeed.zero_stage != 0, self.per_step)
        with self.checkpointer.latest() as fetched:
            self.engine, self.zero_stage = build_engine(
                self.config, plan.tokenizer, plan.layouts, workers, plan.initial_heads,
                load_universal=bool(fetched and fetched.resharded),
                saved_stage=fetched and fetched.zero_stage)
            self.kept = (self.checkpointer.restore(self.engine, fetched) if fetched
                         else {"step": 0})
        self.metrics.phases.since_began("start-up")
        self.evaluator = Evaluator(self.engine, plan.layouts, plan.eval_caches, workers,
                                   self.config.batching.max_tokens_per_pass, self.zero3)
        self.schedule = WorkerSchedule(self.config, self.task_names, plan.train_caches, workers,
                                       self.zero3, plan.tokenizer.pad_token_id,
                                       self.kept.get("mixture"))
        self.callbacks = []
        if len(plan.layouts) > 1:
            self.callbacks.append(TransferSketch(self.engine.module, self.task_names, workers,
                                                 metrics, self.kept["step"]))
        if self.config.run.fail_at_step or self.config.run.fail_node_at_step:
            self.callbacks.append(FaultInjection(self.config, self.run_dir, workers.rank,
                                                 workers.world))

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.plan.layouts]

    # --------------------------------------------------------------- the loop

    def train(self) -> None:
        """Steps from the restored one on; at their points logs, evaluations (reported to Ray
        Tune through TuneReportCallback: what ASHA stops trials on) and checkpoints; at the end
        the final evaluation, checkpoint and export."""
        settings, start = self.config.training, self.kept["step"]
        steps = settings.max_steps
        stream = self.schedule.stream(start)
        if start == 0:
            self.kept["before"] = self.evaluate(0)
            if mixing := self.schedule.mixing:
                self.metrics.mixture(0, self.task_names, mixing.decided[0])
        window = Window.resumed(len(self.task_names), start, settings.log_every, self.per_step)
        bad_in_a_row = 0
        for step in range(start, steps):
            for callback in self.callbacks:
                callback.before_step(step)
            with self.metrics.phases.timed("training"):
                applied = self.train_step(step, stream, window)
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            done = step + 1
            if bad_in_a_row > settings.max_bad_steps:
                raise RunStopped(done, f"{bad_in_a_row} steps in a row (the last {done}) had a "
                                 "non-finite loss or gradients, more than "
                                 f"training.max_bad_steps ({settings.max_bad_steps}); no "
                                 "checkpoint or export was written after them (lower "
                                 "training.learning_rate, or check the tasks' data)")
            if done % settings.log_every == 0 or done == steps:
                self.log_window(done, window)
                window = Window(len(self.task_names))
            if self.schedule.due(done):
                # (the next interval's micro-batches, drawn by its weights)
                self.metrics.mixture(done, self.task_names, self.schedule.decide())
                stream = self.schedule.stream(done)
            paused = time.perf_counter()
            if settings.eval_every and done % settings.eval_every == 0 and done != steps:
                ray.train.report({"step": done, **_flatten(self.evaluate(done))})
            if done % settings.checkpoint_every == 0 and done != steps:
                self.save(done, {"step": done})
            window.start += time.perf_counter() - paused  # (rates count training time only)
        check_weights(self.engine, self.workers, steps)
        final = self.evaluate(steps)
        if start < steps:  # (a restart after the final checkpoint only re-exports)
            # (the metrics of Ray Train's result, which are its latest checkpoint's)
            self.save(steps, {"step": steps, **_flatten(final), "after": final,
                              "before": self.kept.get("before", {})})
        if self.schedule.mixing:
            self.metrics.write_figure("mixture_weights.png", self.schedule.weights_plot())
        with self.metrics.phases.timed("export"):
            export = export_from_engine(self.engine, self.workers.rank, self.plan.tokenizer,
                                        self.run_dir, steps, self.plan.config_yaml)
        self.metrics.time(steps)
        ray.train.report({"step": steps, "export": export or "", **_flatten(final)})

    def train_step(self, step: int, stream, window: Window) -> bool:
        """One optimizer step; False if it was skipped (a non-finite loss or gradients)."""
        num_tasks, device = len(self.task_names), self.workers.device
        # Dropout's masks drawn from the seed, the step and the worker: a run resumed at the same
        # worker count computes what the uninterrupted run computes, bit for bit (which an
        # online mixture's decisions rely on).
        torch.manual_seed(int(np.random.SeedSequence(
            [self.config.training.seed, step, self.workers.rank]).generate_state(1)[0]))
        # Loss sums stay on the device; one transfer per step (not per micro-batch) keeps the
        # accelerator's queue full.
        sums = {name: torch.zeros(size, dtype=torch.float64, device=device) for name, size in (
            ("loss", 1), ("task_loss", num_tasks), ("task_scaled_loss", num_tasks),
            ("task_examples", num_tasks))}
        tokens = torch.zeros(2, dtype=torch.float64)  # real, padded
        slots = torch.zeros(self.per_step, dtype=torch.float64)  # the step's positions
        first = step * self.per_step
        with one_reduction(self.engine, self.zero_stage):
            for micro in range(self.accum):
                waiting = time.perf_counter()
                row = next(stream)
                window.data_wait += time.perf_counter() - waiting
                position = int(row["position"])
                if position != self.schedule.positions[step, micro]:
                    raise RuntimeError(
                        f"worker {self.workers.rank} got micro-batch {position} at step {step}")
                batch = mb.from_bytes(row["payload"])
                pieces = passes(batch, self.schedule.pass_cost[step, micro],
                                self.config.batching.max_tokens_per_pass, self.zero3)
                with around(self.callbacks, batch):
                    # the step's loss: the mean over its micro-batches of each one's mean
                    forward_backward(self.engine, pieces, 1 / self.accum, device, sums)
                tokens += torch.tensor([int(row["num_tokens"]), int(row["padded_tokens"])])
                slots[position - first] = position  # every slot of the step filled once
        # (every worker then has the same totals, so all take the same decision)
        totals = self.workers.sum_parts({**sums, "tokens": tokens, "positions": slots})
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
            self.metrics.skipped(step + 1, [name for name, value in zip(self.task_names, task_loss)
                                            if not math.isfinite(value)], positions)
            return False
        window.add(loss / self.per_step, task_loss, totals["task_examples"].numpy(),
                   *totals["tokens"].tolist(), positions)
        self.schedule.add_losses(totals["task_scaled_loss"].numpy(),
                                 totals["task_examples"].numpy())
        return True

    # -------------------------------------------- at log, evaluation, checkpoint steps

    def log_window(self, step: int, window: Window) -> None:
        """The window's "train" record; its data wait and memory are the largest over workers."""
        on_gpu = self.workers.on_gpu
        gpu_peak = torch.cuda.max_memory_allocated(self.workers.device) / 2**20 if on_gpu else 0
        worst = self.workers.all_reduce(torch.tensor(
            [window.data_wait, resident_mb(), peak_resident_mb(), gpu_peak],
            dtype=torch.float64), "max").tolist()
        if not window.steps:
            return
        record = window.record(step, self.engine.get_lr()[0], self.workers.world,
                               self.task_names, *worst[:3],
                               gpu_peak_mb=worst[3] if on_gpu else None)
        training = self.config.training
        self.metrics.train(record, progress_line(record, window, training.max_steps,
                                                 training.log_every))

    def evaluate(self, step: int) -> dict[str, dict[str, float]]:
        began = time.perf_counter()
        with self.metrics.phases.timed("evaluation"):
            metrics = self.evaluator()
        self.metrics.eval(step, metrics, time.perf_counter() - began)
        for callback in self.callbacks:
            callback.after_evaluation(step)
        return metrics

    def save(self, step: int, metrics: dict) -> None:
        check_weights(self.engine, self.workers, step)
        if mixing := self.schedule.mixing:
            self.kept["mixture"] = mixing.state()
        self.metrics.flush()
        upload = next(filter(None, (c.checkpoint_upload(step) for c in self.callbacks)), None)
        with self.metrics.phases.timed("checkpoints"):
            self.checkpointer.save(self.engine, step, self.zero_stage, self.kept, metrics, upload)


def check_weights(engine, workers: Workers, step: int) -> None:
    """Stop the run if a weight is not finite on some worker: no checkpoint or export ever holds
    a non-finite weight. Under ZeRO-3 each checks its own shards."""
    finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())
                 for p in engine.module.parameters())
    if workers.any(not finite):
        raise RunStopped(step, f"weights became non-finite by step {step}; nothing was saved from "
                         "then on (lower training.learning_rate, or check the tasks' data)")


def evaluate_only(plan: WorkerPlan, workers: Workers, metrics: RunMetrics) -> None:
    """`muppet-ray evaluate`: the validation metrics of the starting model, no training."""
    engine, zero_stage = build_engine(plan.config, plan.tokenizer, plan.layouts, workers,
                                      plan.initial_heads)
    scored = Evaluator(engine, plan.layouts, plan.eval_caches, workers,
                       plan.config.batching.max_tokens_per_pass, zero_stage == 3)
    began = time.perf_counter()
    found = scored()
    metrics.eval(0, found, time.perf_counter() - began)
    # Ray Train's result holds the metrics of the latest checkpoint: worker 0 reports them with
    # one that holds only them (an evaluation never resumes).
    with tempfile.TemporaryDirectory(prefix="muppet-evaluation-") as directory:
        checkpoint = None
        if workers.rank == 0:
            with open(os.path.join(directory, "evaluation.json"), "w") as f:
                json.dump(found, f)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"step": 0, **_flatten(found), "before": found, "after": found},
                         checkpoint=checkpoint)


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


def around(callbacks: list[Callback], batch: mb.Batch) -> contextlib.AbstractContextManager:
    """The callbacks' contexts around a micro-batch (none: nothing to enter)."""
    if not callbacks:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for callback in callbacks:
        stack.enter_context(callback.micro_batch(batch))
    return stack


def _flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{name}": value for task, values in metrics.items()
            for name, value in values.items() if math.isfinite(value)}


def train_loop_per_worker(plan: WorkerPlan) -> None:
    """Ray Train's per-worker function (the launcher binds the plan: prefinetune.launch)."""
    log.setLevel(logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False
    workers = Workers.of_this_run()
    if not workers.on_gpu:
        # One compute thread per CPU Ray gave the worker: torch would otherwise start one per
        # core in every worker, and workers sharing a machine then fight over its cores.
        torch.set_num_threads(max(1, int(plan.config.scaling.cpus_per_worker)))
        # Before the first forward pass: oneDNN's cache of a kernel per shape pins the heap
        # (issue 24, runtime.no_cpu_kernel_cache).
        runtime.no_cpu_kernel_cache()
    metrics = RunMetrics(RunDir(plan.run_dir), workers.rank)
    try:
        if plan.evaluate_only:
            evaluate_only(plan, workers, metrics)
        else:
            Trainer(plan, workers, metrics).train()
    except RunStopped as stop:
        # Logged, not raised: Ray Train would restart a run whose worker raised, and stop it
        # again at the same step. The driver finds no final checkpoint and reads why here.
        metrics.stopped(stop.step, stop.reason)
    # (not after another error: closing flushes to the storage, which may be what failed)
    metrics.close()
