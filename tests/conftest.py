"""Shared fixtures. Integration tests use one real local Ray cluster for the whole session."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from muppet_ray.config import Config, apply_override, expand_variables, validate

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=600, env: dict | None = None):
    """Run `python *args` in a fresh process (its own Ray cluster, if it starts one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from muppet_ray.runtime import local_cluster_environment

    # As muppet-ray starts a local cluster, with more logical CPUs than cores: 2 training
    # workers plus the Ray Data tasks feeding them.
    with local_cluster_environment():
        ray.init(address="local", num_cpus=6, include_dashboard=False,
                 logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """An S3-protocol server (moto's, on 127.0.0.1) with a bucket, its address and credentials
    in this process's environment too, until the module's tests are done; yields them."""
    from tests.services import s3_server

    with s3_server() as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env


def small_run(storage, *overrides: str) -> list[str]:
    """A small, fast run of the default job, stored under `storage`, as `--set` settings."""
    return [f"run.storage_path={storage}", "run.name=run", "tasks.suite_scale=0.25",
            "training.max_steps=24", "training.warmup_steps=4", "training.log_every=2",
            "training.checkpoint_every=8", "training.max_eval_examples=64",
            "model.hidden_size=64", "model.ffn_size=128", *overrides]


def make_config(storage, *overrides: str) -> Config:
    raw: dict = {}
    for assignment in small_run(storage, *overrides):
        apply_override(raw, assignment)
    return validate(expand_variables(raw))
