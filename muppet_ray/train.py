"""The per-worker training function that Ray Train runs on every worker.

One optimizer step = N micro-batches (N = grad_accum_steps x max workers), shared by the W
workers that run now, N / W each; DeepSpeed averages their gradients, so with heterogeneous
batching every update mixes N single-task micro-batches. Steps, evaluations, checkpoints and
reports happen at the same points on every worker (Ray Train and DeepSpeed both need that).

Elastic training: a run restarted with another worker count trains on the same micro-batches in
the same steps (the schedule depends on N, not W). DeepSpeed's ZeRO checkpoint is sharded by
worker, so it is first turned into a universal checkpoint (DeepSpeed's own format for loading
under another world size), which each worker reshards as it loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from muppet_ray import batch as mb
from muppet_ray import data
from muppet_ray.config import Config, micro_batches_per_step
from muppet_ray.export import write_export
from muppet_ray.metrics import MetricsLogger
from muppet_ray.mixture import build_schedule
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.optim import build_optimizer, deepspeed_config
from muppet_ray.storage import RunDir
from muppet_ray.task_types import TASK_TYPES

# Worker output goes through a logger: Ray Train forwards it to the driver once (its patched
# `print` would show every line twice).
log = logging.getLogger("muppet_ray")
FAULT_MARKER = ".fault_injected"
CHECKPOINT_TAG = "deepspeed"
CHECKPOINT_STATE = "checkpoint.json"  # beside DeepSpeed's files: the step and the world size


class Worker:
    """State of one training worker; `run` is the whole training."""

    def __init__(self, setup: dict[str, Any]):
        self.config = Config.model_validate(setup["config"])
        self.config_yaml = setup["config_yaml"]
        self.run_dir = RunDir(setup["run_dir"])
        self.tokenizer = setup["tokenizer"]
        self.specs = setup["task_specs"]
        self.train_caches = setup["train_caches"]
        self.eval_caches = setup["eval_caches"]
        # Fine-tuning: trained heads to start from (tensors keyed as in `MuppetModel.heads`).
        self.initial_heads = setup.get("initial_heads") or {}
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.per_step = micro_batches_per_step(self.config)
        self.accum = self.per_step // self.world  # (config.py checks that it divides)
        self.logger = MetricsLogger(self.run_dir) if self.rank == 0 else None
        self._eval_batches: list | None = None

    # ------------------------------------------------------------------ setup

    def build(self, load_universal: bool = False) -> None:
        on_gpu = self.device.type == "cuda"
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        import deepspeed  # after DS_ACCELERATOR: it picks its accelerator at import

        self.deepspeed = deepspeed
        precision = self.config.deepspeed.precision
        bf16 = precision == "bf16" or (precision == "auto" and on_gpu)
        torch.manual_seed(self.config.training.seed)  # identical initial weights everywhere
        model = MuppetModel(
            build_backbone(self.config.model, self.tokenizer), self.specs,
            self.config.model.dropout, self.config.training.loss_scaling,
            self.config.model.max_target_length, self.tokenizer,
        )
        if self.initial_heads:
            # strict: every tensor handed over must land (a wrong name would silently be lost)
            missing = set(self.initial_heads) - set(model.heads.state_dict())
            if missing:
                raise RuntimeError(f"initial heads {sorted(missing)} are not heads of the model")
            model.heads.load_state_dict(self.initial_heads, strict=False)
        optimizer, scheduler = build_optimizer(model, self.config)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, self.world, self.accum, bf16, load_universal),
        )

    def needs_resharding(self, checkpoint: ray.train.Checkpoint | None) -> bool:
        """Whether the checkpoint's ZeRO shards were written by another number of workers."""
        if checkpoint is None or self.config.deepspeed.zero_stage == 0:
            return False  # (stage 0 shards nothing)
        state = f"{checkpoint.path}/{CHECKPOINT_STATE}"
        if checkpoint.filesystem.get_file_info(state).type == pafs.FileType.NotFound:
            return False  # (written before checkpoints recorded their world size)
        with checkpoint.filesystem.open_input_stream(state) as f:
            saved = json.loads(f.read())["world_size"]
        if saved != self.world and self.rank == 0:
            log.warning(f"[muppet-ray] resuming with {self.world} workers from a checkpoint of "
                        f"{saved}: each now runs {self.accum} of the step's {self.per_step} "
                        "micro-batches")
        return saved != self.world

    def restore(self, checkpoint: ray.train.Checkpoint | None, reshard: bool) -> int:
        """Load the latest checkpoint, if any; returns the number of steps already done."""
        if checkpoint is None:
            return 0
        with (checkpoint.as_directory() as directory,
              tempfile.TemporaryDirectory(prefix="muppet-universal-") as universal):
            if reshard:
                _to_universal(directory, universal)
                directory = universal
            _, client_state = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        return int(client_state["step"])

    # --------------------------------------------------------------- training

    def run_evaluation(self) -> None:
        """`muppet-ray evaluate`: the validation metrics of the starting model, no training."""
        self.build()
        metrics = self.evaluate()
        self.log_eval(0, metrics)
        ray.train.report({"step": 0, **_flatten(metrics)})
        if self.logger:
            self.logger.close()

    def run(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        reshard = self.needs_resharding(checkpoint)
        self.build(load_universal=reshard)
        self.schedule = build_schedule(
            [c.chunks for c in self.train_caches], [c.examples for c in self.train_caches],
            self.config.mixture, self.config.batching, self.per_step,
            self.config.training.max_steps, self.config.training.seed,
            [s["name"] for s in self.specs],
        )
        start = self.restore(checkpoint, reshard)
        steps = self.config.training.max_steps
        stream = data.stream(self.schedule, self.rank, self.world, start, self.train_caches,
                             self.tokenizer.pad_token_id)
        if start == 0:
            self.log_eval(0, self.evaluate())
        train = self.config.training
        window = self._new_window()
        for step in range(start, steps):
            self.maybe_fail(step)
            self.train_step(step, stream, window)
            done = step + 1
            if done % train.log_every == 0 or done == steps:
                self.log_train(done, window)
                window = self._new_window()
            if train.eval_every and done % train.eval_every == 0 and done != steps:
                metrics = self.evaluate()
                self.log_eval(done, metrics)
                # (to Ray Tune, through TuneReportCallback: what ASHA stops trials on)
                ray.train.report({"step": done, **_flatten(metrics)})
            if done % train.checkpoint_every == 0 and done != steps:
                self.checkpoint(done, {"step": done})
        final = self.evaluate()
        self.log_eval(steps, final)
        if start < steps:  # (a restart after the final checkpoint only re-exports)
            self.checkpoint(steps, {"step": steps, **_flatten(final)})
        export = self.export(steps)
        ray.train.report({"step": steps, "export": export or "", **_flatten(final)})
        if self.logger:
            self.logger.close()

    def train_step(self, step: int, stream, window: dict) -> None:
        num_tasks = len(self.specs)
        # Loss sums stay on the device; one transfer per step (not per micro-batch) keeps the
        # accelerator's queue full.
        losses = torch.zeros(1 + 2 * num_tasks, dtype=torch.float64, device=self.device)
        counts = torch.zeros(2 + self.per_step, dtype=torch.float64)
        expected = self.schedule.step_positions(step)
        for micro in range(self.accum):
            row = next(stream)
            position = int(row["position"])
            if position != expected[micro * self.world + self.rank]:
                raise RuntimeError(f"worker {self.rank} got micro-batch {position} at step {step}")
            batch = mb.to_torch(mb.from_bytes(row["payload"]), self.device)
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self.engine.step()
            losses += torch.cat([out["loss"].detach()[None], out["task_loss_sum"],
                                 out["task_examples"]]).double()
            counts[0] += int(row["num_tokens"])
            counts[1] += int(row["padded_tokens"])
            counts[2 + micro * self.world + self.rank] = position  # every slot filled once
        totals = self._all_reduce(torch.cat([losses, counts.to(self.device)]))
        window["loss"] += totals[0].item() / self.per_step
        window["task_loss"] += totals[1:1 + num_tasks].numpy()
        window["task_examples"] += totals[1 + num_tasks:1 + 2 * num_tasks].numpy()
        window["tokens"] += totals[1 + 2 * num_tasks].item()
        window["padded"] += totals[2 + 2 * num_tasks].item()
        window["positions"].extend(int(p) for p in totals[3 + 2 * num_tasks:])
        window["steps"] += 1

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over workers; returns the result on the CPU."""
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values)
        return values.cpu()

    @staticmethod
    def _new_window() -> dict:
        return {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "task_loss": 0.0,
                "task_examples": 0.0, "positions": [], "steps": 0, "start": time.perf_counter()}

    def maybe_fail(self, step: int) -> None:
        """Fault injection (`run.fail_at_step`): one worker dies hard, once per run.

        It first waits (up to a minute) until Ray Train has registered the latest checkpoint,
        which it does on its next poll of the workers, so that the restart resumes from it.
        """
        if step != self.config.run.fail_at_step or self.rank != min(1, self.world - 1):
            return
        if self.run_dir.exists(FAULT_MARKER):
            return
        every = self.config.training.checkpoint_every
        latest = step // every * every
        deadline = time.monotonic() + 60
        while latest and time.monotonic() < deadline and not self._registered(latest):
            time.sleep(0.5)
        self.run_dir.write_text(FAULT_MARKER, f"worker {self.rank} killed at step {step}\n")
        log.warning(f"[muppet-ray] fault injection: worker {self.rank} exits at step {step}")
        os._exit(1)

    def _registered(self, step: int) -> bool:
        snapshot = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints
        return (self.run_dir.exists(snapshot)
                and f"checkpoint_{step:06d}" in self.run_dir.read_text(snapshot))

    # ------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Validation metrics of every task, computed across all workers."""
        if self._eval_batches is None:
            plan = data.eval_chunks(self.eval_caches, self.rank, self.world)
            self._eval_batches = [
                (data.ChunkReader.read(self.eval_caches[task], chunk), counted)
                for task, chunk, counted in plan
            ]
        self.engine.eval()
        stats = None
        for batch, counted in self._eval_batches:
            values = self.engine(mb.to_torch(batch, self.device), evaluate=True).double().cpu()
            stats = (stats if stats is not None else torch.zeros_like(values)) + values * counted
        self.engine.train()
        stats = self._all_reduce(stats).numpy()
        return {
            spec["name"]: TASK_TYPES[spec["type"]].finalize(stats[i])
            for i, spec in enumerate(self.specs)
        }

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, metrics: dict) -> None:
        """DeepSpeed's sharded checkpoint, each worker's shards merged by Ray Train."""
        if self.logger:
            self.logger.flush()
        with tempfile.TemporaryDirectory(prefix="muppet-ckpt-") as directory:
            self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                                        client_state={"step": step})
            nodes = [ray.get_runtime_context().get_node_id()]  # where each shard was written
            if self.world > 1:
                nodes = [None] * self.world
                dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
            if self.rank == 0:
                with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
                    json.dump({"step": step, "world_size": self.world, "nodes": nodes}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_{step:06d}")

    def export(self, step: int) -> str | None:
        module = self.engine.module
        # ZeRO-3 holds a shard of each parameter per worker: gather them (a no-op otherwise).
        with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                return write_export(module, self.tokenizer, self.run_dir, step, self.config_yaml)
        return None

    # ---------------------------------------------------------------- logging

    def log_train(self, step: int, window: dict) -> None:
        if not self.logger or not window["steps"]:
            return
        seconds = time.perf_counter() - window["start"]
        examples = window["task_examples"]
        lr = self.engine.get_lr()[0]
        positions = sorted(window["positions"])
        record = {
            "kind": "train", "step": step, "loss": window["loss"] / window["steps"], "lr": lr,
            "workers": self.world,
            "examples_per_s": float(examples.sum() / seconds),
            "tokens_per_s": window["tokens"] / seconds,
            "real_token_ratio": window["tokens"] / max(window["padded"], 1),
            "task_loss": {s["name"]: float(window["task_loss"][i] / examples[i])
                          for i, s in enumerate(self.specs) if examples[i]},
            "positions": _ranges(positions),
        }
        self.logger.log(record)
        log.info(f"[muppet-ray] step {step}/{self.config.training.max_steps}  "
                 f"loss {record['loss']:.4f}  lr {lr:.2e}  {record['examples_per_s']:,.0f} ex/s  "
                 f"{record['tokens_per_s']:,.0f} tok/s")

    def log_eval(self, step: int, metrics: dict[str, dict[str, float]]) -> None:
        if not self.logger:
            return
        self.logger.log({"kind": "eval", "step": step, "metrics": metrics})
        self.logger.flush()
        summary = "  ".join(
            f"{task} {next(iter(values.values())):.3f}" for task, values in metrics.items())
        log.info(f"[muppet-ray] eval @ step {step}: {summary}")


def _to_universal(directory: str, out: str) -> None:
    """DeepSpeed's ZeRO checkpoint in `directory` as a universal checkpoint in `out`."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(directory, CHECKPOINT_TAG),
        output_folder=os.path.join(out, CHECKPOINT_TAG),
        num_extract_workers=1, num_merge_workers=1,  # in this process: no process pools
        keep_temp_folder=False, strict=True, inject_missing_state=True))


def _flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{name}": value for task, values in metrics.items()
            for name, value in values.items() if math.isfinite(value)}


def _ranges(positions: list[int]) -> list[list[int]]:
    """Sorted positions as half-open [first, end) runs."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs



def train_loop_per_worker(setup: dict[str, Any]) -> None:
    log.setLevel(logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False
    worker = Worker(setup)
    worker.run_evaluation() if setup.get("evaluate_only") else worker.run()
