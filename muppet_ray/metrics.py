"""The run's metrics log (JSON Lines) and TensorBoard events, written by worker 0.

Records: {"kind": "train", "step", "loss", "lr", "examples_per_s", "tokens_per_s",
"real_token_ratio", "task_loss": {task: loss}, "positions": [first, end)} every `log_every` steps
and {"kind": "eval", "step", "metrics": {task: {metric: value}}} at each evaluation. After a
restart, steps after the restored checkpoint are logged again: the last record of a step is the
one that counts.
"""

from __future__ import annotations

import json
import os
import tempfile

from muppet_ray.storage import RunDir

LOG = "metrics.jsonl"


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
