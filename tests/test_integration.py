"""End-to-end runs on a real local Ray cluster: real Ray Data, 2 real Ray Train workers and real
DeepSpeed on CPU. Nothing is mocked."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModel

from muppet_ray import checkpoint, data
from muppet_ray.config import micro_batches_per_step
from muppet_ray.errors import DataError, StorageError
from muppet_ray.export import load_exported
from muppet_ray.metrics import LOG, read_log
from muppet_ray.mixture import build_schedule
from muppet_ray.prefinetune import prefinetune
from muppet_ray.storage import RunDir
from tests.conftest import ROOT, make_config, small_run

pytestmark = pytest.mark.integration


def train_records(run_dir):
    return [r for r in read_log(RunDir(run_dir)) if r["kind"] == "train"]


def assert_loss_falls(run_dir):
    losses = [r["loss"] for r in train_records(run_dir)]
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


def schedule_of(result, config):
    caches = data.read_run_caches(RunDir(result.run_dir))
    train = [caches[t.name]["train"] for t in result.tasks]
    return train, build_schedule(
        [c.chunks for c in train], [c.examples for c in train], config.mixture, config.batching,
        micro_batches_per_step(config), config.training.max_steps, config.training.seed,
        [t.name for t in result.tasks])


def test_non_finite_steps_are_skipped_too_many_stop_the_run_and_changed_data_is_refused(
        ray_cluster, tmp_path):
    # Regression targets so large that their squared error overflows to inf: the steps that
    # hold them are skipped on both workers alike, and the run goes on.
    rows = [{"text": f"value {i}", "label": 1e30 if i % 50 == 5 else i / 200}
            for i in range(200)]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "huge", "type": "regression", "train": str(path), "validation": str(path)}
    settings = [f"tasks.custom=[{json.dumps(task)}]", "tasks.include=[huge, sentiment]",
                "mixture.rule=uniform", "model.arch=roberta", "training.max_steps=10",
                "training.checkpoint_every=10"]
    result = prefinetune(make_config(tmp_path, *settings))
    records = read_log(RunDir(result.run_dir))
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert skipped and all(r["tasks"] == ["huge"] for r in skipped)
    # every micro-batch is accounted for, trained or skipped
    positions = sorted(p for r in records if r["kind"] in ("train", "skipped")
                       for a, b in r["positions"] for p in range(a, b))
    assert positions == list(range(10 * 4))
    model, _, _ = load_exported(result.export_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # The data changes (and with it the tokenizer a fresh start would train on the tasks' text):
    # the same command is refused, naming the file, and the run's tokenizer and data record are
    # left as they were.
    run = tmp_path / "run"
    tokenizer = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    path.write_text(path.read_text().replace("value 1", "amount 1"))
    record = (run / "data.json").read_text()
    with pytest.raises(DataError, match=rf"task 'huge': its train data \({path}\) changed since "
                                        "the run started"):
        prefinetune(make_config(tmp_path, *settings))
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == tokenizer
    assert (run / "data.json").read_text() == record

    # Allowed none in a row: the run stops at the first, in one line, and saves nothing after.
    from muppet_ray.errors import TrainingError

    with pytest.raises(TrainingError, match=r"more than training.max_bad_steps \(0\)"):
        prefinetune(make_config(tmp_path, *settings, "training.max_bad_steps=0", "run.name=stop"))
    assert not (tmp_path / "stop" / "export").exists()


@pytest.fixture
def small_storage(tmp_path):
    """A real small file system (tmpfs) that a test can fill up, where this machine lets it
    mount one (root); else a plain directory, and `None` for the file system."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    yield path, path if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_once(storage, ready, room: int = 0) -> threading.Thread:
    """Fills `storage` once `ready()`, up to its last `room` bytes."""
    def fill() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ready():
            time.sleep(0.2)
        # Only the small file system, and only once its moment came: a test that failed first
        # has unmounted it, and this filled the machine's own disk (51 GB) in CI.
        if not (ready() and os.path.ismount(storage)):
            return
        with open(storage / "filler", "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while f.write(bytes(1 << 20)):  # (until the file system is full)
                    pass
            os.ftruncate(f.fileno(), max(0, os.fstat(f.fileno()).st_size - room))

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def test_a_run_resumes_after_its_storage_fills(ray_cluster, small_storage):
    # ZeRO-3, micro-batches run in passes of 256 tokens, as many on both workers at each call.
    storage, tmpfs = small_storage
    zero3 = ["deepspeed.zero_stage=3", "batching.max_tokens_per_pass=256"]
    run_dir = RunDir(str(storage / "run"))
    log = storage / "run" / LOG
    config = make_config(storage, *zero3)
    before = checkpoint.local_copies()

    # 1. The storage fills up once the step-8 checkpoint is in: the run stops, one line names
    # the path. (Where no small file system can be mounted here, not root, the driver and its
    # local cluster are SIGKILLed there instead. A sweep's driver is killed mid-run in
    # test_multinode.py.)
    if tmpfs is not None:
        # (room for the run's log, not for a checkpoint: the next checkpoint's upload fails)
        filler = fill_once(tmpfs, lambda: "checkpoint_000008" in run_dir.registered_checkpoints(),
                           room=256 << 10)
        with pytest.raises(StorageError, match=r"^cannot write \S+: No space left on device "
                                               r"\(errno 28\); free space"):
            prefinetune(make_config(storage, *zero3, "run.max_failures=0"))  # (no retries)
        filler.join(timeout=60)
        (tmpfs / "filler").unlink()
        # (the failed upload's local copy is removed with it: Ray removes only uploaded ones)
        assert not copies_left_behind(before)
    else:
        command = [sys.executable, "-m", "muppet_ray", "prefinetune",
                   *[a for s in small_run(storage, *zero3) for a in ("--set", s)]]
        driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and driver.poll() is None and \
                    "checkpoint_000008" not in run_dir.registered_checkpoints():
                time.sleep(0.2)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert "checkpoint_000008" in run_dir.registered_checkpoints()
    assert not run_dir.exists("export")

    # 3. Once there is room, it resumes again and finishes: never started over, every
    # micro-batch trained once, and it learned.
    result = prefinetune(config)
    logged = [(r["kind"], r["step"]) for r in map(json.loads, log.read_text().splitlines())]
    assert logged.count(("eval", 0)) == 1 and logged.count(("train", 2)) == 1
    positions = [p for r in train_records(result.run_dir) for a, b in r["positions"]
                 for p in range(a, b)]
    assert positions == list(range(24 * micro_batches_per_step(config)))
    assert_loss_falls(result.run_dir)
    assert AutoModel.from_pretrained(result.export_dir) is not None
    # Task transfer is measured under ZeRO-3 too, and logged for every task (that its sketches
    # are the whole gradients', not a worker's shards: test_accumulation.py).
    transfer = [r for r in map(json.loads, log.read_text().splitlines())
                if r["kind"] == "transfer"][-1]
    assert transfer["step"] == 24 and transfer["tasks"] == [t.name for t in result.tasks]
    assert np.allclose(np.diag(transfer["cosine"]), 1, atol=1e-3)
    assert (storage / "run" / "gradient_similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert not copies_left_behind(before)  # (a SIGKILLed one's: removed on restart)


def copies_left_behind(before: dict[str, int]) -> list[str]:
    """The local copies of checkpoints made since `before` whose workers are gone, once the
    workers of the run are (Ray stops them asynchronously; another run's may live on)."""
    deadline = time.monotonic() + 30
    while True:
        new = {path: pid for path, pid in checkpoint.local_copies().items() if path not in before}
        if time.monotonic() > deadline or not any(map(checkpoint.process_alive, new.values())):
            return [path for path, pid in new.items() if not checkpoint.process_alive(pid)]
        time.sleep(0.5)

