"""The command as a user runs it (subprocesses): a data error, resume refusal, the console
script, the local cluster's addresses. The bad-input catalogue is test_bad_input.py."""

import json
import subprocess
import sys

import pytest

from muppet_ray import cli
from tests.conftest import ROOT, run_cli


def assert_rejected(done, expected, storage):
    assert done.returncode == 2, done.stderr[-2000:]
    # one line, and none of Ray's, Ray Data's or DeepSpeed's own (those stay in Ray's logs)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("muppet-ray: error: "), lines
    assert expected in lines[0]
    assert all(line.startswith("[muppet-ray]") for line in done.stdout.strip().splitlines())
    assert not storage.exists() or not any(storage.iterdir())


@pytest.mark.integration
def test_label_outside_the_label_space(tmp_path):
    rows = [{"text": f"row {i}", "label": "yes" if i % 3 else "no"} for i in range(30)]
    rows[7]["label"] = "maybe"
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    storage = tmp_path / "runs"
    task = {"name": "mine", "type": "classification", "train": str(path),
            "labels": ["no", "yes"]}
    done = run_cli("-m", "muppet_ray", "prefinetune", "--set", f"tasks.custom=[{json.dumps(task)}]",
                   "--set", "tasks.include=[mine]", "--set", f"run.storage_path={storage}")
    assert_rejected(done, f"task 'mine', {path}, row 8: label 'maybe' is not in the label space",
                    storage)


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "muppet_ray", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "prefinetune" in done.stdout


def test_resuming_a_run_with_another_config_is_refused(tmp_path, capsys):
    storage = tmp_path / "runs"
    (storage / "old").mkdir(parents=True)
    (storage / "old" / "config.yaml").write_text("training: {max_steps: 5}\nrun: {name: old}\n")
    code = cli.main(["prefinetune", "--set", f"run.storage_path={storage}", "--set",
                     "run.name=old"])
    assert code == 2
    assert "exists with a different config (training.max_steps)" in \
        capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in (storage / "old").iterdir()) == ["config.yaml"]


def test_a_run_from_before_zero_stage_auto_resumes_with_it():
    from muppet_ray.config import Config, to_yaml
    from muppet_ray.prefinetune import changed_settings

    stored = to_yaml(Config().replace({"deepspeed.zero_stage": 2}))
    assert changed_settings(stored, to_yaml(Config())) == []  # auto: the checkpoint's stage
    assert changed_settings(stored, to_yaml(Config().replace({"deepspeed.zero_stage": 3}))) == [
        "deepspeed.zero_stage"]


def test_a_local_cluster_listens_on_loopback_only_and_verbose_shows_its_output():
    probe = """
import os, psutil, ray, time
from muppet_ray.config import Config
from muppet_ray.runtime import start_ray
start_ray(Config())
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
# the local cluster's settings: its processes have them, this one got its environment back
seen = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote())
print("environment", seen, os.environ.get("RAY_API_SERVER_ADDRESS"),
      os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))
print(ray.get_runtime_context().gcs_address)
for c in psutil.net_connections(kind="inet"):
    if c.status == "LISTEN" and c.pid in ours:
        print(c.laddr.ip)
ray.get(ray.remote(lambda: print("a worker's own line")).remote())
time.sleep(2)  # (Ray forwards a worker's output asynchronously)
ray.shutdown()
"""
    done = run_cli("-c", probe, timeout=120, env={"MUPPET_VERBOSE": "1"})  # (as --verbose)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a worker's own line" in done.stdout  # (without --verbose: test_bad_input's lines)
    assert "environment http://127.0.0.1:0 None None" in done.stdout
    gcs, *addresses = [line for line in done.stdout.splitlines()
                       if not line.startswith(("[muppet-ray]", "environment"))
                       and "(<lambda> pid=" not in line]
    assert gcs.startswith("127.0.0.1:") and len(addresses) >= 3
    assert set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_ray_train_check_interval_is_refused_before_anything_starts(
        tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", value)
    storage = tmp_path / "runs"
    code = cli.main(["prefinetune", "--set", f"run.storage_path={storage}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "muppet-ray: error: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: expected a number of seconds "
        f"above 0, got {value!r}")
    assert not storage.exists() or not any(storage.iterdir())
