"""Cluster conventions, on this machine: a real Ray head started with `ray start --head` (as many
CPUs as the job's workers take: the Ray Data tasks feeding them hold none) and a job sent with
`ray job submit`, beside a local run that must not notice. Several nodes and object storage:
test_multinode.py."""

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

from muppet_ray import data
from muppet_ray.export import load_exported
from muppet_ray.metrics import LOG
from muppet_ray.prefinetune import prefinetune
from tests.conftest import ROOT, make_config
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
         f"--dashboard-agent-grpc-port={free_port()}", "--num-cpus=2", "--disable-usage-stats"],
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
                         "'run-${MUPPET_TEST_TOKEN}'}}", "training.max_steps=60",
                         "training.warmup_steps=15", "training.log_every=10",
                         "training.checkpoint_every=60")
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

    # (not started while the run beside tokenizes: once then a Ray Data task of that run
    # aborted importing grpc, "absl::log_internal::SetTimeZone() has already been called")
    with ray_head() as address:
        submit = ray_cli(
            "job", "submit", f"--address={address}", "--submission-id=muppet-test",
            "--working-dir", ".", "--", "python", "jobs/prefinetune.py",
            "--config", "jobs/configs/encoder-only.yaml",
            "--set", f"run.storage_path={tmp_path}", "--set", "run.name=job",
            "--set", "training.max_steps=6", "--set", "tasks.suite_scale=0.1",
            "--set", "tasks.include=[sentiment, needs, what_has]",
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
    assert len(model.heads) > 0 and len(manifest["tasks"]) == 3

    # The run beside finished in one go: no worker lost, nothing trained twice.
    assert "error" not in beside, beside.get("error")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    logged = [(r["kind"], r["step"]) for r in records]
    assert logged == [("eval", 0), *[("train", s) for s in range(10, 61, 10)], ("eval", 60),
                      ("transfer", 60), ("time", 60)]
    check_zero2_run(beside["result"], config, tmp_path / "beside", capfd)

    # Task-transfer diagnostics (transfer.py): every task's gradient similarity to every other,
    # measured across the two workers, and the heat map beside the log.
    transfer, tasks = records[-2], [t.name for t in beside["result"].tasks]
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

    # The two workers held different tasks at the same micro-step (heterogeneous batches), as
    # the run dealt its micro-batches out (by size: Schedule.worker_positions).
    train, schedule = schedule_of(result, config)
    cost = data.position_costs(schedule, train)
    held = [schedule.task[schedule.worker_positions(rank, 2, cost=cost), 0] for rank in (0, 1)]
    assert (held[0] != held[1]).mean() > 0.5

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


# ------------------------------------------------ what the cluster can give a run (cluster.py)


@contextlib.contextmanager
def autoscaler_offers(*groups: dict):
    """The cluster config an autoscaler reports to Ray (its node groups: resources, counts), as
    Ray Train and Ray Data read it; written into this cluster's GCS for the test's duration."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name=f"group{i}", min_count=0, max_count=2,
                                       resources=resources)
        for i, resources in enumerate(groups)])
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        yield
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)


def test_gpus_are_used_where_the_cluster_or_its_autoscaler_has_them(
        ray_cluster, monkeypatch, tmp_path):
    from muppet_ray.cluster import use_gpu
    from muppet_ray.config import ScalingConfig
    from muppet_ray.runtime import LOCAL_CLUSTER

    monkeypatch.setenv("HOME", str(tmp_path))  # (no cluster launcher's config there)
    with monkeypatch.context() as local:  # (a local cluster of muppet-ray's: no autoscaler)
        local.setenv(LOCAL_CLUSTER, "1")
        assert use_gpu(ScalingConfig()) == (False, "the cluster has no GPU")
    assert use_gpu(ScalingConfig(use_gpu=True)) == (True, "scaling.use_gpu")
    assert use_gpu(ScalingConfig()) == (False, "the cluster has no GPU, and what its autoscaler "
                                        "adds is not known here (scaling.use_gpu: true for GPUs)")
    # The cluster launcher's config on the head names its node types (cluster/aws.yaml's form)
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "available_node_types:\n  head: {resources: {CPU: 0}, min_workers: 0, max_workers: 0}\n"
        "  gpu: {resources: {CPU: 8, GPU: 4}, min_workers: 0, max_workers: 4}\n")
    assert use_gpu(ScalingConfig()) == (True, "the cluster's autoscaler adds nodes with GPUs")
    (tmp_path / "ray_bootstrap_config.yaml").unlink()
    with autoscaler_offers({"CPU": 8}):
        assert use_gpu(ScalingConfig()) == (
            False, "the cluster has no GPU and its autoscaler adds none")
    with autoscaler_offers({"CPU": 8}, {"CPU": 16, "GPU": 4}):
        assert use_gpu(ScalingConfig()) == (True, "the cluster's autoscaler adds nodes with GPUs")
        assert use_gpu(ScalingConfig(use_gpu=False)) == (False, "scaling.use_gpu")


def test_a_run_waits_for_the_autoscaler_then_stops_in_one_line(
        ray_cluster, monkeypatch, tmp_path, capsys):
    from muppet_ray import cluster, runtime
    from muppet_ray.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path))  # (no cluster launcher's config there)
    gpu_worker = {"CPU": 1, "GPU": 1}
    cluster.wait_for_room({"CPU": 1}, 2, 1, "the workers")  # (the cluster holds them: no wait)
    # Nothing the cluster has or could add holds a GPU worker: at once, one line.
    began = time.monotonic()
    with monkeypatch.context() as local, pytest.raises(
            ConfigError, match=r"^scaling: the run needs 2 x \{CPU: 1, GPU: 1\} for the "
                               r"workers; the cluster has \{CPU: 6\} and no autoscaler \("):
        local.setenv(runtime.LOCAL_CLUSTER, "1")  # (a local cluster of muppet-ray's)
        cluster.wait_for_room(gpu_worker, 2, 600, "the workers")
    with autoscaler_offers({"CPU": 8}), pytest.raises(
            ConfigError, match=r"and its autoscaler adds no node that holds a worker \("):
        cluster.wait_for_room(gpu_worker, 2, 600, "the workers")
    assert time.monotonic() - began < 5
    # Its autoscaler adds GPU nodes (none come here): it waits, saying so, then stops.
    monkeypatch.setattr(cluster, "WAIT_LINE_EVERY_S", 1)
    with autoscaler_offers({"CPU": 8, "GPU": 1}), pytest.raises(
            ConfigError, match=r"^scaling.start_timeout_s: waited \d+ s for the autoscaler to add "
                               r"nodes for 2 x \{CPU: 1, GPU: 1\} for the workers; the cluster "
                               r"still has \{CPU: 6\}$"):
        cluster.wait_for_room(gpu_worker, 2, 3, "the workers")
    # (Ray adds its own warning here: no autoscaler actually runs to take the request)
    lines = [line for line in capsys.readouterr().out.splitlines() if "[muppet-ray]" in line]
    assert len(lines) >= 2 and all(line.startswith(
        "[muppet-ray] waiting for the autoscaler: 2 x {CPU: 1, GPU: 1} for the workers (")
        for line in lines), lines
    # (the placement group that asked for them is gone)
    from ray.util import placement_group_table

    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


def test_a_local_storage_path_is_refused_where_nodes_can_be_added(ray_cluster, tmp_path):
    from muppet_ray.cluster import check_shared
    from muppet_ray.errors import ConfigError

    check_shared(str(tmp_path))  # one node, no autoscaler known: fine
    check_shared("s3://bucket/runs")
    with autoscaler_offers({"CPU": 8}), pytest.raises(
            ConfigError, match=r"run.storage_path: '.+' is a local path, and the cluster's "
                               "autoscaler adds nodes that cannot be checked to see it"):
        check_shared(str(tmp_path))
    check_shared("s3://bucket/runs")
