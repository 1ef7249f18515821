"""runtime.py is the one place for Ray's and DeepSpeed's private names and for environment
changes; a Ray that moved one fails at start in one line (no cluster started)."""

import re
from pathlib import Path

import pytest

from muppet_ray import runtime

PACKAGE = Path(runtime.__file__).parent
OUTSIDE = re.compile(r"ray\._private|ray\.data\._internal|_coalesce_grad_reduction|"
                     r"os\.environ\[[^]]*\]\s*=[^=]|os\.environ\.(setdefault|update|pop)")


def test_private_names_and_environment_changes_live_in_runtime_only():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "runtime.py":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not OUTSIDE.search(line), f"{path.name}:{number}: {line.strip()}"


def test_every_private_name_relied_on_is_there():
    runtime.check_private_names()
    assert runtime.cluster_config is not None


def test_a_moved_private_name_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(runtime.PRIVATE, "ray._private.worker", "_moved_away")
    with pytest.raises(RuntimeError, match=r"^muppet-ray relies on ray\._private\.worker\."
                                           r"_moved_away, which ray \S+ does not have"):
        runtime.check_private_names()


def test_no_cpu_kernel_cache_sets_the_capacity_only_where_unset(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_CACHE_CAPACITY, raising=False)
    runtime.no_cpu_kernel_cache()
    assert runtime.os.environ[runtime.ONEDNN_CACHE_CAPACITY] == "0"
    monkeypatch.setenv(runtime.ONEDNN_CACHE_CAPACITY, "64")  # (a user's own setting stays)
    runtime.no_cpu_kernel_cache()
    assert runtime.os.environ[runtime.ONEDNN_CACHE_CAPACITY] == "64"
