"""The run's metrics: the log (JSON Lines) and TensorBoard events, written by worker 0; the
window of steps a "train" record sums up; the console's progress lines.

Records: {"kind": "train", "step", "loss", "lr", "examples_per_s", "tokens_per_s",
"real_token_ratio", "task_loss": {task: loss}, "positions": [first, end)} every `log_every` steps
and {"kind": "eval", "step", "metrics": {task: {metric: value}}} at each evaluation; with an
online mixture, {"kind": "mixture", "step", "weights": {task: weight}} at each decision; at the
end, {"kind": "time", "step", "began", "seconds": {phase: seconds}} (worker 0's `Phases`). After a
restart, steps after the restored checkpoint are logged again: the last record of a step is the
one that counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from muppet_ray.storage import RunDir

LOG = "metrics.jsonl"
CONSOLE_LINES = 20  # progress lines a run prints (metrics.jsonl keeps every record)
# Worker output goes through a logger: Ray Train forwards it to the driver once (its patched
# `print` would show every line twice).
log = logging.getLogger("muppet_ray")


@dataclass
class Phases:
    """Where a worker's time goes, by phase (start-up, evaluation, training, checkpoints, export);
    `began`: when the worker started (wall clock, so the driver can add its side of it)."""

    began: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def since_began(self, phase: str) -> None:
        self.seconds[phase] = time.time() - self.began


@dataclass
class Window:
    """What the steps since the last training record add up to, over all workers."""

    num_tasks: int
    steps: int = 0
    loss: float = 0.0  # sum of the steps' mean losses
    tokens: float = 0.0  # real tokens
    padded: float = 0.0  # tokens computed (padding included)
    data_wait: float = 0.0  # seconds this worker waited for its micro-batches
    task_loss: np.ndarray = field(init=False)  # [num_tasks] summed per-example losses
    task_examples: np.ndarray = field(init=False)  # [num_tasks] examples
    positions: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.task_loss = np.zeros(self.num_tasks)
        self.task_examples = np.zeros(self.num_tasks)

    @classmethod
    def resumed(cls, num_tasks: int, start: int, log_every: int, per_step: int) -> Window:
        """The first window of a run (re)started at step `start`. Resumed inside a window: its
        steps up to the checkpoint were trained before, and the record that now closes the
        window replaces the earlier one, so it lists their positions too (its loss and rates
        cover the steps trained now)."""
        first = start // log_every * log_every
        return cls(num_tasks, positions=list(range(first * per_step, start * per_step)))

    def add(self, loss: float, task_loss, task_examples, tokens: float, padded: float,
            positions: list[int]) -> None:
        self.steps += 1
        self.loss += loss
        self.task_loss += task_loss
        self.task_examples += task_examples
        self.tokens += tokens
        self.padded += padded
        self.positions += positions

    def record(self, step: int, lr: float, workers: int, tasks: list[str], data_wait: float,
               rss_mb: float, peak_rss_mb: float, gpu_peak_mb: float | None = None) -> dict:
        """The window's "train" record (data wait and memory: the largest over workers)."""
        seconds = time.perf_counter() - self.start
        examples = self.task_examples
        return {
            "kind": "train", "step": step, "loss": self.loss / self.steps, "lr": lr,
            "workers": workers,
            "examples_per_s": float(examples.sum() / seconds),
            "tokens_per_s": self.tokens / seconds,
            "real_token_ratio": self.tokens / max(self.padded, 1),
            "data_wait_share": data_wait / seconds,
            "rss_mb": rss_mb,
            "peak_rss_mb": peak_rss_mb,
            **({"gpu_peak_mb": gpu_peak_mb} if gpu_peak_mb is not None else {}),
            "task_loss": {name: float(self.task_loss[i] / examples[i])
                          for i, name in enumerate(tasks) if examples[i]},
            "positions": ranges(sorted(self.positions)),
        }


def progress_line(record: dict, window: Window, steps: int, log_every: int) -> str | None:
    """The console's line for a train record, about CONSOLE_LINES a run (None between)."""
    step = record["step"]
    if step % (log_every * -(-steps // (CONSOLE_LINES * log_every))) and step != steps:
        return None
    left = (steps - step) * (time.perf_counter() - window.start) / window.steps
    return (f"[muppet-ray] step {step}/{steps}  loss {record['loss']:.4f}  "
            f"{record['tokens_per_s']:,.0f} tok/s  data wait {record['data_wait_share']:.0%}  "
            f"rss {record['rss_mb']:,.0f} MB  ETA {int(left // 60)}m{int(left % 60):02d}s")


def ranges(positions: list[int]) -> list[list[int]]:
    """Sorted positions as half-open [first, end) runs."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def resident_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux)


class MetricsLogger:
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        if run_dir.is_local:
            self.local = run_dir.path
        else:  # object storage can't append: keep a local copy and upload it on flush
            self.local = tempfile.mkdtemp(prefix="muppet-metrics-")
            if run_dir.exists(LOG):
                with open(os.path.join(self.local, LOG), "w") as f:
                    f.write(run_dir.read_text(LOG))
            if run_dir.exists("tensorboard"):  # (flush replaces the folder with the local one)
                run_dir.download("tensorboard", os.path.join(self.local, "tensorboard"))
        os.makedirs(self.local, exist_ok=True)
        _drop_torn_line(os.path.join(self.local, LOG))
        self._file = open(os.path.join(self.local, LOG), "a")  # noqa: SIM115 (closed in close)
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a worker failure must not lose what was already logged
        step = record["step"]
        if record["kind"] == "train":
            for key in ("loss", "lr", "examples_per_s", "tokens_per_s", "real_token_ratio"):
                self._tensorboard.add_scalar(f"train/{key}", record[key], step)
            for task, loss in record["task_loss"].items():
                self._tensorboard.add_scalar(f"task_loss/{task}", loss, step)
        elif record["kind"] == "eval":
            for task, metrics in record["metrics"].items():
                for name, value in metrics.items():
                    self._tensorboard.add_scalar(f"eval/{task}/{name}", value, step)

    def flush(self) -> None:
        self._file.flush()
        self._tensorboard.flush()
        if not self.run_dir.is_local:
            with open(os.path.join(self.local, LOG)) as f:
                self.run_dir.write_text(LOG, f.read())
            self.run_dir.upload(os.path.join(self.local, "tensorboard"), "tensorboard")

    def close(self) -> None:
        self.flush()
        self._file.close()
        self._tensorboard.close()


class RunMetrics:
    """What a training worker says of its run. Every worker makes the same calls; worker 0
    writes metrics.jsonl, TensorBoard, the run directory's figures and the console lines, the
    others nothing."""

    def __init__(self, run_dir: RunDir, rank: int):
        self.run_dir = run_dir
        self.logger = MetricsLogger(run_dir) if rank == 0 else None
        self.phases = Phases()  # (made as the worker starts: its start-up counts from here)

    def log(self, record: dict) -> None:
        if self.logger:
            self.logger.log(record)

    def write_figure(self, name: str, png: bytes) -> None:
        if self.logger:
            self.run_dir.write_bytes(name, png)

    def train(self, record: dict, line: str | None) -> None:
        self.log(record)
        if self.logger and line:
            log.info(line)

    def eval(self, step: int, metrics: dict[str, dict[str, float]], seconds: float) -> None:
        if not self.logger:
            return
        self.logger.log({"kind": "eval", "step": step, "seconds": seconds, "metrics": metrics})
        self.logger.flush()
        summary = "  ".join(
            f"{task} {next(iter(values.values())):.3f}" for task, values in metrics.items())
        log.info(f"[muppet-ray] eval @ step {step}: {summary}")

    def skipped(self, step: int, tasks: list[str], positions: list[int]) -> None:
        if not self.logger:
            return
        # (the positions keep the audit whole: every micro-batch is in a train or skip record)
        self.logger.log({"kind": "skipped", "step": step, "tasks": tasks,
                         "positions": ranges(sorted(positions))})
        log.warning(f"[muppet-ray] step {step} skipped: non-finite loss or gradients "
                    f"(tasks {tasks or 'unknown: the loss was finite'})")

    def mixture(self, step: int, tasks: list[str], weights: list[float]) -> None:
        """The weights an online mixture draws with from `step` on (mixture.py)."""
        self.log({"kind": "mixture", "step": step, "weights": dict(zip(tasks, weights))})

    def time(self, step: int) -> None:
        self.log({"kind": "time", "step": step, "began": self.phases.began,
                  "seconds": dict(self.phases.seconds)})

    def stopped(self, step: int, reason: str) -> None:
        self.log({"kind": "stopped", "step": step, "reason": reason})

    def flush(self) -> None:
        if self.logger:
            self.logger.flush()

    def close(self) -> None:
        if self.logger:
            self.logger.close()
            self.logger = None


def read_log(run_dir: RunDir) -> list[dict]:
    """The log as it counts: for each (kind, step), the last record written."""
    if not run_dir.exists(LOG):
        return []
    latest: dict[tuple[str, int], dict] = {}
    lines = run_dir.read_text(LOG).split("\n")
    for line in lines[:-1]:  # (the last: empty, or one cut short by a crash or a full disk)
        if line.strip():
            record = json.loads(line)
            latest[record["kind"], record["step"]] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


def _drop_torn_line(path: str) -> None:
    """A line cut short (the worker killed, or the storage full, mid-write) is cut off before
    appending: the next record would otherwise continue it, and neither would parse."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
