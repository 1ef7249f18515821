"""Cluster conventions, on this machine: a real Ray head started with `ray start --head` and a job
sent with `ray job submit`, beside a local run that must not notice; an elastic run on two Ray
nodes that loses one of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from muppet_ray.export import load_exported
from muppet_ray.metrics import LOG
from muppet_ray.prefinetune import prefinetune
from muppet_ray.storage import RunDir
from tests.conftest import ROOT, make_config, run_cli
from tests.test_integration import assert_loss_falls, schedule_of

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_cluster_env() -> dict:
    """The environment of a cluster of one's own (this process prepared a local cluster's), with
    token authentication, as Ray sets it up for a new cluster (the token is in ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token"}


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=other_cluster_env(), capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def ray_head():
    """A Ray head, with its dashboard, in its own process tree, loopback only; yields the job
    server's address."""
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", "--num-cpus=4", "--disable-usage-stats"],
        env=other_cluster_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while (listed := ray_cli("job", "list", f"--address={address}")).returncode:
            if time.monotonic() > deadline or head.poll() is not None:
                head.terminate()
                raise RuntimeError(f"the Ray head did not start: {listed.stderr[-1000:]}\n"
                                   f"{head.communicate(timeout=60)[0][-2000:]}")
            time.sleep(1)
        yield address
    finally:
        # The head's processes (GCS, raylet, dashboard, workers) share its process group: killed
        # at once (`ray start --block` stops them one by one on SIGTERM: 30 s of the suite).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)


def test_ray_job_submit_beside_a_zero2_run_that_learns_and_exports(
        ray_cluster, tmp_path, monkeypatch, capfd):
    # A ZeRO-2 run goes on in this process's local cluster (no dashboard, as muppet-ray starts
    # one) while a second cluster, `ray start --head` with its dashboard, starts beside it on the
    # same machine and runs a muppet-ray job sent with `ray job submit`: neither disturbs the
    # other. A credential passed as ${VAR} (here into DeepSpeed's config) is used but never
    # written.
    monkeypatch.setenv("MUPPET_TEST_TOKEN", "tok-5ecret-91f3")
    config = make_config(tmp_path / "beside", "deepspeed.zero_stage=2",
                         "deepspeed.config={tensorboard: {enabled: false, job_name: "
                         "'run-${MUPPET_TEST_TOKEN}'}}", "training.max_steps=80",
                         "training.log_every=10", "training.checkpoint_every=80")
    assert config.deepspeed.config["tensorboard"]["job_name"] == "run-tok-5ecret-91f3"
    beside: dict = {}

    def run_beside() -> None:
        try:
            beside["result"] = prefinetune(config)
        except Exception as error:  # (reported below, on the test's thread)
            beside["error"] = error

    thread = threading.Thread(target=run_beside, daemon=True)
    thread.start()
    log = tmp_path / "beside" / "run" / LOG
    deadline = time.monotonic() + 300
    while '"train"' not in (log.read_text() if log.exists() else "") and thread.is_alive():
        assert time.monotonic() < deadline, "the run beside never trained"
        time.sleep(0.5)

    with ray_head() as address:
        submit = ray_cli(
            "job", "submit", f"--address={address}", "--submission-id=muppet-test",
            "--working-dir", ".", "--", "python", "jobs/prefinetune.py",
            "--config", "jobs/configs/encoder-only.yaml",
            "--set", f"run.storage_path={tmp_path}", "--set", "run.name=job",
            "--set", "training.max_steps=6", "--set", "tasks.suite_scale=0.1",
            "--set", "training.max_eval_examples=32", "--set", "model.num_layers=1",
            timeout=600)  # (waits for the job, printing its logs)
        status = ray_cli("job", "status", "muppet-test", f"--address={address}")
        thread.join(timeout=600)
    assert "Job 'muppet-test' succeeded" in status.stdout, submit.stdout[-3000:]  # SUCCEEDED
    assert "what_has" in submit.stdout and "summarize" not in submit.stdout
    # The job's log holds muppet-ray's lines, none forwarded from Ray's processes ("(… pid=…)")
    assert "[muppet-ray] step 6/6" in submit.stdout
    assert not [line for line in submit.stdout.splitlines() if " pid=" in line]
    export = tmp_path / "job" / "export"
    assert type(AutoModel.from_pretrained(export)).__name__ == "RobertaModel"
    model, tokenizer, manifest = load_exported(str(export))
    assert manifest["step"] == 6 and not manifest["encoder_decoder"]
    assert len(model.heads) > 0 and len(manifest["tasks"]) == 7

    # The run beside finished in one go: no worker lost, nothing trained twice.
    assert "error" not in beside, beside.get("error")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    logged = [(r["kind"], r["step"]) for r in records]
    assert logged == [("eval", 0), *[("train", s) for s in range(10, 81, 10)], ("eval", 80),
                      ("transfer", 80)]
    check_zero2_run(beside["result"], config, tmp_path / "beside", capfd)

    # Task-transfer diagnostics (transfer.py): every task's gradient similarity to every other,
    # measured across the two workers, and the heat map beside the log.
    transfer, tasks = records[-1], [t.name for t in beside["result"].tasks]
    assert transfer["tasks"] == tasks and len(tasks) == 8  # (the suite's, summarization too)
    cosine = np.array(transfer["cosine"])
    assert cosine.shape == (8, 8) and np.allclose(cosine, cosine.T, atol=1e-3)
    assert np.allclose(np.diag(cosine), 1, atol=1e-3) and np.abs(cosine).max() <= 1 + 1e-3
    assert (log.parent / "gradient_similarity.png").read_bytes()[:4] == b"\x89PNG"


def check_zero2_run(result, config, storage, capfd) -> None:
    console = capfd.readouterr()
    assert "5ecret" not in console.out + console.err
    for path in storage.rglob("*"):
        # (DeepSpeed pickles the config it was given into its own checkpoint files: README)
        if path.is_file() and path.suffix != ".pt":
            assert b"5ecret" not in path.read_bytes(), path
    assert "${MUPPET_TEST_TOKEN}" in (storage / "run" / "config.yaml").read_text()
    assert_loss_falls(result.run_dir)
    assert set(result.before) == set(result.after) == {t.name for t in result.tasks}

    # The two workers held different tasks at the same micro-step (heterogeneous batches).
    _, schedule = schedule_of(result, config)
    pairs = schedule.task[:, 0].reshape(-1, 2)
    assert (pairs[:, 0] != pairs[:, 1]).mean() > 0.5

    # The export loads with plain transformers and matches the final checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    steps = config.training.max_steps
    state = get_fp32_state_dict_from_zero_checkpoint(
        f"{result.run_dir}/checkpoint_{steps:06d}", tag="deepspeed")
    model, tokenizer, manifest = load_exported(result.export_dir)
    assert manifest["step"] == steps
    assert [t["name"] for t in manifest["tasks"]] == [t.name for t in result.tasks]
    model.load_state_dict(state, strict=False)
    reloaded = AutoModel.from_pretrained(result.export_dir).eval()
    inputs = tokenizer(["alice has a red ball .", "bob told carol about the rain"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.backbone.eval().get_encoder()(**inputs).last_hidden_state
        got = reloaded.get_encoder()(**inputs).last_hidden_state
    assert torch.allclose(expected, got, atol=1e-5)
    exported_heads, _, _ = load_exported(result.export_dir)
    for name, tensor in exported_heads.heads.state_dict().items():
        assert torch.allclose(tensor, state[f"heads.{name}"], atol=1e-6), name


def test_elastic_run_loses_a_node_and_finishes_from_its_checkpoint(tmp_path):
    scenario = run_cli("tests/scenarios/two_nodes.py", str(tmp_path), timeout=900)
    assert scenario.returncode == 0, scenario.stdout[-3000:] + scenario.stderr[-3000:]
    outcome = json.loads(scenario.stdout.strip().splitlines()[-1])
    assert outcome["finished"]
    run = RunDir(outcome["run_dir"])
    records = [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines()]
    train = [r for r in records if r["kind"] == "train"]

    # Both nodes trained, and wrote their shards of one checkpoint into the one run directory.
    first = json.loads(run.read_text("checkpoint_000008/checkpoint.json"))
    assert first["world_size"] == 2 and len(set(first["nodes"])) == 2
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        run.list("checkpoint_000008/deepspeed"))
    # After the node went, one worker resumed from the newest checkpoint (step 8, or a later one
    # where the run got past it before the node was gone: steps take ~0.1 s) and finished alone.
    resumed = [r for r in train if r["workers"] == 1]
    assert resumed
    resumed_from = resumed[0]["step"] - 2
    assert resumed_from in (8, 16, 24)
    assert json.loads(run.read_text(f"checkpoint_{resumed_from:06d}/checkpoint.json")
                      )["world_size"] == 2
    assert [r["workers"] for r in train if r["step"] <= resumed_from] == [2] * (resumed_from // 2)
    assert json.loads(run.read_text("checkpoint_000032/checkpoint.json"))["world_size"] == 1
    # What the docs promise: a step is the same micro-batches whatever the worker count, so the
    # optimizer's batch did not change, and no micro-batch was lost or trained twice.
    per_step = 2 * 2  # batching.grad_accum_steps x max workers
    final = {r["step"]: r for r in train}  # the last record of each step counts
    for step, record in final.items():
        assert record["positions"] == [[(step - 2) * per_step, step * per_step]], record
    assert sorted(final) == list(range(2, 33, 2))
    losses = [final[s]["loss"] for s in sorted(final)]
    assert min(losses[-4:]) < losses[0]
    assert outcome["removed_after_step"] >= 8
    assert load_exported(run.uri("export"))[2]["step"] == 32
