"""The run's metrics log across restarts (no Ray): what a restarted worker 0 finds and keeps."""

import pyarrow.fs as pafs

from muppet_ray.metrics import LOG, MetricsLogger, read_log
from muppet_ray.storage import RunDir


def record(step: int) -> dict:
    return {"kind": "train", "step": step, "loss": 1.0 / step, "lr": 1e-3, "examples_per_s": 1.0,
            "tokens_per_s": 1.0, "real_token_ratio": 1.0, "task_loss": {"a": 1.0},
            "positions": [[step - 1, step]]}


def write(run_dir: RunDir, *steps: int) -> None:
    logger = MetricsLogger(run_dir)
    for step in steps:
        logger.log(record(step))
    logger.close()


def test_a_restart_on_object_storage_keeps_the_earlier_tensorboard_events(tmp_path):
    # Object storage can't append, so the logger works on a local copy and uploads it; a real
    # pyarrow file system that is not the local one takes that path (as s3:// or gs:// would).
    run_dir = RunDir(str(tmp_path / "run"))
    run_dir.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    assert not run_dir.is_local
    write(run_dir, 1, 2)
    write(run_dir, 3)  # the restarted worker 0
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one per start; the first start's was not deleted
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]


def test_a_line_cut_short_is_dropped_before_the_next_start_appends(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    write(run_dir, 1, 2)
    log = tmp_path / "run" / LOG
    text = log.read_text()
    log.write_text(text[:-20])  # the worker died (or the disk filled) writing step 2's line
    assert [r["step"] for r in read_log(run_dir)] == [1]
    write(run_dir, 2, 3)
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]
    assert log.read_text().count("\n") == 3


def test_the_time_line_never_has_a_negative_part_whatever_two_nodes_clocks_say():
    from muppet_ray.prefinetune import time_line

    driver = {"starting Ray": 4.0, "tokenizing": 30.0}
    worker = {"began": 1010.0, "seconds": {"start-up": 3.0, "training": 50.0}}
    # worker 0 began 10 s after the driver handed the run to Ray Train (at 1000 by its clock)
    assert time_line(driver, 1000.0, worker, 100.0) == (
        "100 s: starting Ray 4.0, tokenizing 30.0, start-up 13.0, training 50.0, other 3.0")
    # on a node whose clock is behind the driver's, it seems to begin before: never below 0
    assert time_line(driver, 1030.0, worker, 80.0) == (
        "80 s: starting Ray 4.0, tokenizing 30.0, start-up 3.0, training 50.0, other 0.0")
