"""The bench scripts' bad input: one line naming the argument and what was expected, exit status
2, and nothing run (each case fails before the script's work would start: a case that got past
its check would run a benchmark, or end in a traceback, and fail here)."""

from __future__ import annotations

import re
import runpy
import sys

import pytest
from conftest import ROOT, run_cli

MODEL_FILES = "models/all-MiniLM-L6-v2 below it"
CASES = [  # (script, arguments, the line it prints; {tmp}: an empty folder)
    ("rescore", ["--config", "{tmp}/nope.yaml", "--storage", "{tmp}", "--eval-tasks", "a"],
     "config file '{tmp}/nope.yaml': cannot read (No such file or directory)"),
    ("rescore", ["--config", "x", "--storage", "{tmp}", "--eval-tasks", "a", "--fractions",
                 "0.1,all"], "--fractions 0.1,all: expected comma-separated float values"),
    ("rescore", ["--config", "x", "--storage", "{tmp}", "--eval-tasks", "a", "--groups", "0"],
     "--groups 0: expected a number above 0"),
    ("tokenize_cost", ["{tmp}/nope.yaml"],
     "config file '{tmp}/nope.yaml': cannot read (No such file or directory)"),
    ("bare_loop", ["{tmp}"], "{tmp}: expected a muppet-ray run's directory (its config.yaml "
                             "and tasks.json)"),
    ("bare_loop", ["{tmp}", "--threads", "0"], "--threads 0: expected a number above 0"),
    ("worker_memory", ["{tmp}"], "{tmp}: expected a muppet-ray run's directory (its "
                                 "config.yaml and tasks.json)"),
    ("protocol_run", ["--code", "{tmp}"],
     "--code {tmp}: expected a checkout of muppet-ray (a folder holding muppet_ray/)"),
    ("protocol_run", ["--repeats", "0"], "--repeats 0: expected a number above 0"),
    ("command_time", ["--code", str(ROOT), "--code", "{tmp}"],
     "--code {tmp}: expected a checkout of muppet-ray (a folder holding muppet_ray/)"),
    ("command_time", ["--code", str(ROOT), "--shared", "{tmp}"],
     f"--shared {{tmp}}: expected data/bigbench/*/task.json and {MODEL_FILES}"),
    ("command_time", ["--code", str(ROOT), "--nodes", "2"],
     "--nodes 2: needs --s3 (the nodes share nothing but a bucket)"),
    ("command_time", ["--code", str(ROOT), "--nodes", "-1"],
     "--nodes -1: expected a number of worker nodes, 1 or more"),
    ("soak", ["--code", "{tmp}"],
     "--code {tmp}: expected a checkout of muppet-ray (a folder holding muppet_ray/)"),
    ("throughput", ["--shared", "{tmp}"],
     f"--shared {{tmp}}: expected data/bigbench/*/task.json and {MODEL_FILES}"),
    ("throughput", ["--repeats", "0"], "--repeats 0: expected a number above 0"),
    ("naive", ["--shared", "{tmp}"],
     f"--shared {{tmp}}: expected data/bigbench/*/task.json and {MODEL_FILES}"),
    ("naive", ["--micro-batch", "0"], "--micro-batch 0: expected a number above 0"),
    ("gpu_throughput", ["--workloads", "long,bogus"],
     "--workloads long,bogus: 'bogus' is not one of long, mix, suite"),
    ("gpu_throughput", ["--zero", "4"], "--zero 4: '4' is not one of auto, 0, 1, 2, 3"),
    ("gpu_throughput", ["--sizes", "huge", "--dry-run"],
     "--sizes huge: 'huge' is not one of base, large, tiny"),
    ("allreduce", ["--sizes-mb", "1,x"], "--sizes-mb 1,x: expected comma-separated float values"),
    ("allreduce", ["--sizes-mb", "0"], "--sizes-mb 0.0: expected a number above 0"),
    ("scaling", ["--passes", "0"], "--passes 0: expected a number above 0"),
    ("mixture", ["--tasks", "0"], "--tasks 0: expected a number above 0"),
    ("packing", ["--repeats", "0"], "--repeats 0: expected a number above 0"),
    ("zero3_hooks", ["--steps", "-1"], "--steps -1: expected a number above 0"),
    ("gpu_attention", ["--batch", "0"], "--batch 0: expected a number above 0"),
    ("gpu_check", ["--steps", "0"], "--steps 0: expected a number above 0"),
    ("storage", ["--repeats", "0"], "--repeats 0: expected a number above 0"),
    ("resize_exactness", ["--steps", "0"], "--steps 0: expected a number above 0"),
]


@pytest.mark.parametrize(("script", "args", "expected"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_bench_input_is_one_line(script, args, expected, tmp_path, capsys, monkeypatch):
    tmp = str(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *(a.replace("{tmp}", tmp)
                                                               for a in args)])
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])  # (as `python bench/X`)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "bench" / f"{script}.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"bench: {expected.replace('{tmp}', tmp)}\n"
    assert list(tmp_path.iterdir()) == []  # (nothing written)


def test_a_bad_task_in_protocol_runs_own_process_is_its_one_line():
    """protocol_run.py runs each checkout in a process of its own: the error made there comes
    back as its line, with the checkout it came from."""
    done = run_cli("bench/protocol_run.py", "--task", "nosuch", "--repeats", "1", timeout=300)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"bench: [0-9a-f]{7,}\+?: tasks\.include: unknown task or family "
                        r"'nosuch'; see `muppet-ray tasks list` \(families: .*\)\n",
                        done.stderr), done.stderr
