"""Where users run it: a Ray cluster of three nodes (`ray start`, loopback) that share nothing but
an S3 bucket (moto's server on 127.0.0.1), each worker node with its own scratch disk
(tests/services.py). On it, as a user would, from the command line:

- a task-count sweep scored by the protocol, its driver killed and the sweep restored;
- a ZeRO-2 pre-finetuning run with a worker on each node and an online mixture, one worker
  SIGKILLed while uploading a checkpoint (it resumes from the one before, in the bucket, and
  computes again what it computed, bit for bit), then a whole node lost (it resumes resharded on
  the node left); every micro-batch trained once (a checkpoint damaged after it was registered
  is passed over: tests/test_checkpoint.py);
- `export --from s3://… --out s3://…` of that run.

Nothing is mocked: real Ray, Ray Data, Ray Train, Ray Tune and DeepSpeed; the S3 server is moto's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
from transformers import AutoModelForSequenceClassification

from muppet_ray import data
from muppet_ray.checkpoint import UNIVERSAL_DONE, damage, step_of
from muppet_ray.config import micro_batches_per_step, parse_config
from muppet_ray.metrics import LOG, read_log
from muppet_ray.mixture import build_schedule
from muppet_ray.storage import RunDir, local_copy
from tests.conftest import ROOT, small_run
from tests.services import BUCKET, SECRET, multinode_cluster

pytestmark = pytest.mark.integration
STORAGE = f"s3://{BUCKET}/runs"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    with multinode_cluster(s3, workers=2, log_dir=tmp_path_factory.mktemp("nodes")) as nodes:
        yield nodes


def muppet(cluster, *args: str, **popen) -> subprocess.Popen:
    """`muppet-ray ARGS` as a driver on the head's machine (its own scratch directory). Tune
    snapshots a sweep's state every second (default: every 10 s at least)."""
    env = cluster.driver_env(PYTHONUNBUFFERED="1", TUNE_GLOBAL_CHECKPOINT_S="1")
    return subprocess.Popen([sys.executable, "-m", "muppet_ray", *args], cwd=ROOT,
                            env={**os.environ, **env}, text=True, start_new_session=True,
                            **popen)


def run(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    process = muppet(cluster, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def sets(*settings: str) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def bucket(s3) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(STORAGE)


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.5)


def test_a_task_count_sweep_in_the_bucket_survives_its_driver(s3, cluster, tmp_path):
    tiny = ["tasks.suite_scale=0.1", "training.max_steps=12", "training.warmup_steps=1",
            "training.checkpoint_every=4", "training.log_every=2", "training.max_eval_examples=32",
            "model.hidden_size=32", "model.ffn_size=64", "model.num_layers=1",
            "scaling.num_workers=1", "batching.micro_batch_size=8",
            "protocol.learning_rates=[1e-4]",
            "tasks.include=[sentiment, topic, entailment, rating, needs, next_number, what_has]",
            f"run.storage_path={STORAGE}", "run.name=sweep"]
    report = tmp_path / "docs" / "results.md"
    command = ["sweep", "tasks", "--counts", "0,4", "--eval-tasks", "review", "--seeds", "0",
               "--max-concurrent", "1", "--task-seed", "1", "--report", str(report), *sets(*tiny)]
    root = RunDir(f"{STORAGE}/sweep")
    with open(tmp_path / "first.log", "w") as log:
        first = muppet(cluster, *command, stdout=log, stderr=subprocess.STDOUT)
    try:
        # killed with its Tune trials and Ray Train run once the plain backbone's point is
        # scored, the 4-task point's run has its first checkpoint in the bucket, and Tune has
        # stored its own state there since the first point finished (every 5 s: sweep.py)
        wait_for(lambda: root.exists("0-tasks-results.json") and "checkpoint_000004" in RunDir(
            root.uri("4-tasks-prefinetune")).registered_checkpoints(), "checkpoint", first)
        finished = root.fs.get_file_info(f"{root.path}/0-tasks-results.json").mtime_ns
        wait_for(lambda: any(  # (S3 keeps whole seconds: one later than the point's results)
            i.base_name.startswith("experiment_state") and i.mtime_ns >= finished + 10**9
            for i in root.fs.get_file_info(pafs.FileSelector(f"{root.path}/tune"))),
            "Tune state stored", first, timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    second = run(cluster, *command)
    assert second.returncode == 0, (tmp_path / "first.log").read_text()[-2000:] + \
        second.stdout[-3000:] + second.stderr[-3000:]
    assert "restoring the sweep" in second.stdout
    assert root.fs.get_file_info(f"{root.path}/0-tasks-results.json").mtime_ns == finished
    # The killed point's run resumed from its checkpoint: not started over, none lost.
    point = RunDir(root.uri("4-tasks-prefinetune"))
    logged = [(r["kind"], r["step"]) for r in map(json.loads, point.read_text(LOG).split(
        "\n")[:-1])]
    assert logged.count(("eval", 0)) == 1 and logged.count(("train", 2)) == 1
    assert positions_trained(point) == list(range(12 * 2))  # (2 micro-batches a step)

    rows = json.loads(root.read_text("results.json"))
    # the protocol: each point x its one learning rate, scored on validation and test
    assert sorted({r["tasks"] for r in rows}) == [0, 4] and len(rows) == 2
    assert all("error" not in r and 0 <= r["test"] <= 1 for r in rows)
    order = json.loads(root.read_text("task_order.json"))["order"]
    config = root.read_text("4-tasks-prefinetune/config.yaml")
    assert "include:\n" + "".join(f"  - {t}\n" for t in order[:4]) in config
    assert root.read_text("results.csv").count("\n") == 3
    summary = root.read_text("summary.md")
    assert "Paired difference to '0 tasks'" in summary
    assert f"| review | 1 | {', '.join(order[:4])} |" in summary  # moved it most, at 100%
    assert root.fs.get_file_info(f"{root.path}/plots/tasks_curve.png").size > 1000
    text = report.read_text()
    assert "muppet-ray sweep tasks --counts 0,4" in text and "at commit `" in text
    assert summary.split("\n", 1)[1].split("Plots:")[0].strip() in text
    assert (tmp_path / "docs" / "results-tasks_curve.png").stat().st_size > 1000


def assert_logged_twice_alike(run_dir: RunDir, keys: list[tuple[str, int]]) -> None:
    """Each (kind, step) record was logged twice, the same both times but for rates and
    memory."""
    lines = [json.loads(line) for line in run_dir.read_text(LOG).split("\n")[:-1]]
    for kind, step in keys:
        both = [{k: v for k, v in r.items() if not k.endswith(("_per_s", "_mb", "_share"))}
                for r in lines if (r["kind"], r["step"]) == (kind, step)]
        assert len(both) == 2 and both[0] == both[1], both


def positions_trained(run_dir: RunDir) -> list[int]:
    return [p for r in read_log(run_dir) if r["kind"] == "train" for a, b in r["positions"]
            for p in range(a, b)]


def test_pre_finetuning_on_two_nodes_loses_a_worker_then_a_node_then_exports_from_the_bucket(
        s3, cluster, tmp_path):
    # A worker on each worker node (each has one "trainer"), ZeRO-2, an elastic [1, 2] run with
    # checkpoints at 9, 18, 27. Worker 0 (which writes the run's log) is SIGKILLed halfway
    # through uploading the step-18 checkpoint: the run resumes from step 9 (inside a logging
    # window of 2 steps) and saves step 18 beside the half-written one. At step 24 worker 1
    # kills its node's raylet: the run resumes on one worker from the step-18 checkpoint of two
    # (resharded). The mixture is online: its weights are decided every 4 steps from the losses.
    settings = small_run(
        STORAGE, "model.arch=roberta", "deepspeed.zero_stage=2", "scaling.num_workers=[1, 2]",
        "scaling.resources_per_worker={trainer: 1}", "tasks.include=[sentiment, topic, needs, "
        "what_has]", "training.max_steps=32", "training.checkpoint_every=9",
        "run.fail_at_step=18", "run.fail_rank=0", "run.fail_node_at_step=24",
        "run.max_failures=4", "run.keep_checkpoints=8", "mixture.rule=online",
        "mixture.online_every=4")
    run_dir = RunDir(f"{STORAGE}/run")
    driver = run(cluster, "prefinetune", *sets(*settings))
    console = driver.stdout + driver.stderr
    assert driver.returncode == 0, console[-4000:]
    assert run_dir.read_text(".node_fault_injected") == "node of worker 1 killed at step 24\n"
    assert run_dir.read_text(".fault_injected").startswith(
        "worker 0 killed at step 18 while uploading")
    # The half-written checkpoint was never registered, nor written into again.
    assert damage(run_dir.fs, f"{run_dir.path}/checkpoint_000018") is not None
    assert "checkpoint_000018" not in run_dir.registered_checkpoints()

    records = read_log(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    logged = [(r["kind"], r["step"]) for r in map(json.loads, run_dir.read_text(LOG).split(
        "\n")[:-1])]
    # Resumed from step 9: steps up to 8 logged once, 10..18 twice, and never started over.
    assert logged.count(("eval", 0)) == 1
    assert logged.count(("train", 8)) == 1 and logged.count(("train", 10)) == 2
    assert logged.count(("train", 18)) == 2
    # Resumed with as many workers, it computed again what it had computed, bit for bit: the
    # same losses, and the online mixture's same decisions (so the same micro-batches after).
    assert_logged_twice_alike(run_dir, [("train", s) for s in (12, 14, 16, 18)] +
                              [("mixture", 12), ("mixture", 16)])
    # Both nodes wrote shards of the first checkpoints into the bucket.
    first = json.loads(run_dir.read_text("checkpoint_000009/checkpoint.json"))
    assert first["world_size"] == 2 and len(set(first["nodes"])) == 2
    # After the node went, one worker resumed from the step-18 checkpoint of two, converted
    # once into its universal form.
    alone = [r for r in train if r["workers"] == 1]
    assert alone and alone[0]["step"] == 20, [(r["step"], r["workers"]) for r in train]
    resumed_from = "checkpoint_000018_1"
    assert json.loads(run_dir.read_text(f"{resumed_from}/checkpoint.json"))["world_size"] == 2
    assert json.loads(run_dir.read_text(f"{resumed_from}/{UNIVERSAL_DONE}")) == {"problem": None}
    assert "resuming with 1 workers from a checkpoint of 2" in console
    # Data guarantee: every micro-batch position trained exactly once in the run that counts,
    # in order (the same 4 a step whatever the workers), and no example twice within a pass over
    # its task.
    per_step = 2 * 2  # grad_accum_steps x max workers
    assert positions_trained(run_dir) == list(range(32 * per_step))
    assert [r["workers"] for r in train if r["step"] <= step_of(resumed_from)] == \
        [2] * (step_of(resumed_from) // 2)
    config = parse_config(run_dir.read_text("config.yaml"))
    caches = data.read_run_caches(run_dir)
    names = [t["name"] for t in json.loads(run_dir.read_text("tasks.json"))]
    train_caches = [caches[name]["train"] for name in names]
    # (the micro-batches that the logged weights give: what the run trained on)
    decided = [[r["weights"][n] for n in names] for r in records if r["kind"] == "mixture"]
    assert len(decided) == 8 and decided[-1] != decided[0]  # (steps 0, 4, ..., 28)
    assert run_dir.exists("mixture_weights.png")
    assert run_dir.fs.get_file_info(f"{run_dir.path}/mixture_weights.png").size > 1000
    schedule = build_schedule(
        [c.chunks for c in train_caches], [c.examples for c in train_caches], config.mixture,
        config.batching, micro_batches_per_step(config), 32, config.training.seed, names,
        decided)
    seen: dict = {}
    for p in positions_trained(run_dir):
        task, chunk, epoch = (int(x[p, 0]) for x in (schedule.task, schedule.chunk,
                                                     schedule.epoch))
        ids = set(data.ChunkReader.read(train_caches[task], chunk)["example_id"].tolist())
        assert not ids & seen.get((task, epoch), set()), (task, epoch)
        seen.setdefault((task, epoch), set()).update(ids)
    assert run_dir.exists("export/muppet.json")

    # Exported from the bucket as a transformers task model into the bucket, as a user would.
    # (Fine-tuning `--from` a run in the bucket is what the sweep's scoring above does.)
    export = run(cluster, "export", "--from", f"{STORAGE}/run", "--task", "sentiment", "--out",
                 f"s3://{BUCKET}/models/sentiment")
    assert export.returncode == 0, export.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(
        local_copy(f"s3://{BUCKET}/models/sentiment"))
    assert model.config.id2label == {0: "negative", 1: "positive"}

    # The credentials were used, never written: not in any object of the bucket, nor in the
    # temporary files of the head's machine (the worker nodes' went with them).
    fs, _ = bucket(s3)
    for info in fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                assert SECRET.encode() not in f.read(), info.path
    for folder, _, files in os.walk(f"{cluster.scratch}/tmp"):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    assert SECRET.encode() not in f.read(), path
