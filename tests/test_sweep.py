"""Ray Tune sweeps: nested task sets, search spaces, bad input, and a fine-tuning search whose
ASHA stops a weak trial. (A real task-count sweep, killed mid-way and restored, runs on the
multi-node cluster: test_multinode.py.)"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from muppet_ray import cli
from muppet_ray.errors import ConfigError
from muppet_ray.storage import RunDir
from muppet_ray.sweep import kept_rows, nested_task_sets, parse_search
from muppet_ray.sweep_report import moved_most

POOL = ["sentiment", "topic", "entailment", "rating", "needs", "next_number", "what_has"]
TINY = ["tasks.suite_scale=0.1", "training.max_steps=4", "training.warmup_steps=1",
        "training.checkpoint_every=4", "training.max_eval_examples=32", "model.hidden_size=32",
        "model.ffn_size=64", "model.num_layers=1", "scaling.num_workers=1",
        "batching.micro_batch_size=8"]


def test_task_sets_are_nested_and_seeded():
    order, sets = nested_task_sets(POOL, [0, 2, 4, 7], seed=3)
    assert sorted(order) == sorted(POOL) and sets[0] == [] and sets[7] == order
    assert sets[2] == sets[4][:2] and sets[4] == sets[7][:4]
    assert nested_task_sets(POOL, [2], seed=3)[0] == order  # the seed fixes the order
    assert nested_task_sets(POOL, [2], seed=4)[0] != order
    with pytest.raises(ConfigError, match="--counts: 9 tasks asked for, but the pool has 7"):
        nested_task_sets(POOL, [2, 9], seed=0)
    with pytest.raises(ConfigError, match="distinct task counts"):
        nested_task_sets(POOL, [2, 2], seed=0)


def test_search_spaces():
    space = parse_search(["training.learning_rate=loguniform(1e-5,1e-3)",
                          "batching.micro_batch_size=choice(8,16)",
                          "training.warmup_steps=grid(0, 4)"])
    assert set(space) == {"training.learning_rate", "batching.micro_batch_size",
                          "training.warmup_steps"}
    assert space["training.warmup_steps"] == {"grid_search": [0, 4]}
    assert 1e-5 <= space["training.learning_rate"].sample() <= 1e-3
    with pytest.raises(ConfigError, match="--search 'lr=1e-3': expected section.key="):
        parse_search(["lr=1e-3"])


def test_moved_most_names_the_tasks_a_step_added_only_when_it_can():
    def row(tasks, task, test, fraction=1.0):
        return {"point": f"{tasks} tasks", "model": f"{tasks} tasks", "tasks": tasks, "task": task,
                "metric": "accuracy", "fraction": fraction, "seed": 0, "learning_rate": 1e-4,
                "validation": 0.5, "test": test, "train_examples": 10, "steps": 3, "head": "new"}
    rows = [row(0, "review", 0.50), row(2, "review", 0.60), row(7, "review", 0.58),
            row(0, "needs", 0.50), row(2, "needs", 0.51), row(7, "needs", 0.40),
            row(0, "review", 0.50, 0.1), row(2, "review", 0.49, 0.1), row(7, "review", 0.30, 0.1)]
    lines = moved_most(rows, POOL)
    assert "| review | 1 | sentiment, topic | +10.0 |" in lines  # 0 -> 2: the largest step
    # 2 -> 7 adds 5 tasks: still named
    assert "| needs | 1 | entailment, rating, needs, next_number, what_has | -11.0 |" in lines
    # each fraction has its own largest step
    assert "| review | 0.1 | entailment, rating, needs, next_number, what_has | -19.0 |" in lines
    # one step that adds the whole pool of 27 names no task: any of them could have done it
    pool = [f"t{i}" for i in range(27)]
    lines = moved_most([row(0, "review", 0.5), row(27, "review", 0.45)], pool)
    assert lines[-1] == ("| review | 1 | tasks 1 to 27 of task_order.json, all at once (counts "
                         "in between would tell them apart) | -5.0 |"), lines


@pytest.mark.parametrize(("args", "expected"), [
    (["tasks", "--counts", "0,2", "--eval-tasks", "needs"],
     "--eval-tasks ['needs'] are in the pre-finetuning pool"),
    (["tasks", "--counts", "0,20", "--eval-tasks", "review"], "--counts: 20 tasks asked for"),
    (["tasks", "--counts", "0,2", "--eval-tasks", "poetry"], "unknown task or family 'poetry'"),
    (["finetune", "--from", "/nonexistent", "--task", "review", "--search", "x=1"],
     "--search 'x=1': expected"),
    (["tasks", "--counts", "0,2", "--eval-tasks", "review", "--ablate", "protocol.head=new"],
     "--ablate 'protocol.head=new': an ablation changes pre-finetuning"),
    (["tasks", "--counts", "0,2", "--eval-tasks", "review", "--prefinetune-seeds", "1,2"],
     "--prefinetune-seeds: expected distinct seeds, one of them training.seed (0)"),
    (["tasks", "--counts", "0,2", "--eval-tasks", "review", "--task-seed", "0,0"],
     "--task-seed: expected distinct task seeds"),
])
def test_bad_sweep_input(tmp_path, args, expected, capsys):
    # (in this process, as the bad-input catalogue: the errors come before Ray starts)
    code = cli.main(["sweep", *args, "--set", f"run.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("muppet-ray: error: ") and expected in err[-1], err
    assert not any(tmp_path.iterdir())


def test_sweep_report_of_a_directory_that_is_no_sweep(tmp_path, capsys):
    assert cli.main(["sweep", "report", "--from", str(tmp_path)]) == 2
    assert "no sweep.json or results.json" in capsys.readouterr().err


def test_finetune_search_stops_weak_trials_early(ray_cluster, tmp_path):
    from muppet_ray.model_source import initial_weights
    from muppet_ray.prefinetune import build_tokenizer
    from muppet_ray.sweep import sweep_finetune
    from muppet_ray.tasks import resolve_tasks
    from tests.conftest import make_config

    base = make_config(tmp_path, *TINY, "training.max_steps=12", "training.eval_every=6",
                       "run.name=search")
    tokenizer = build_tokenizer(base, resolve_tasks(base))
    plain = initial_weights(base, tokenizer, str(tmp_path / "plain"))
    report = sweep_finetune(base, plain, "sentiment",
                            ["training.learning_rate=grid(5e-3,1e-8)"], samples=1,
                            grace_steps=6, max_concurrent=1)
    trials = report["trials"]
    assert len(trials) == 2 and all(t["status"] == "done" for t in trials)
    # ASHA (reduction factor 2) stopped the weak one at its first milestone
    assert [t["steps"] for t in trials] == [12, 6], trials
    assert report["best"]["training.learning_rate"] == 5e-3 and report["best"]["steps"] == 12
    saved = json.loads((tmp_path / "search" / "best.json").read_text())
    assert saved["best"]["value"] == report["best"]["value"]


def test_a_sweep_whose_points_fail_says_which_and_exits_non_zero(tmp_path):
    # Bad data shows only where the point's run reads it (in the trial): the sweep writes what
    # it has, then fails in one line naming the point and the error. Run as a user would, from
    # their own directory with relative paths (its own local cluster, started there).
    rows = [{"text": f"row {i}", "label": "maybe" if i == 7 else "yes" if i % 3 else "no"}
            for i in range(30)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "mine", "type": "classification", "train": "mine.jsonl",
            "labels": ["no", "yes"]}
    args = ["-m", "muppet_ray", "sweep", "tasks", "--counts", "0,1", "--eval-tasks", "review",
            "--max-concurrent", "1"]
    for setting in [*TINY, "run.storage_path=store", "run.name=sweep",
                    "protocol.learning_rates=[1e-4]", f"tasks.custom=[{json.dumps(task)}]",
                    "tasks.include=[mine]"]:
        args += ["--set", setting]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("muppet-ray: error: 1 of 2 sweep points failed: 1 tasks: "), line
    # (the trial read the task's file, relative to where the sweep was started)
    assert "label 'maybe' is not in the label space" in line, line
    rows = json.loads((tmp_path / "store" / "sweep" / "results.json").read_text())
    failed = next(r for r in rows if r["point"] == "1 tasks")
    assert "label 'maybe'" in failed["error"]
    # The plain backbone's point was scored, and its scores kept below the storage root where
    # the user asked (not in the trial's own directory, which a restored sweep would not find
    # again).
    assert [r["point"] for r in rows if "error" not in r] == ["0 tasks"]
    cache = tmp_path / "store" / ".protocol-cache"
    assert len(list(cache.glob("*.json"))) == 1
    # Tune's state lost (a new machine given only the sweep's result files, and no score
    # cache either): the same command keeps the finished point from its stored results, without
    # scoring it again, and runs the failed one again.
    shutil.rmtree(tmp_path / "store" / "sweep" / "tune")
    shutil.rmtree(cache)
    again = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == line
    assert not cache.exists() or not list(cache.glob("*.json"))
    kept = json.loads((tmp_path / "store" / "sweep" / "results.json").read_text())
    assert [r for r in kept if "error" not in r] == [r for r in rows if "error" not in r]


def test_a_point_is_kept_only_with_the_params_it_finished_with(tmp_path):
    root = RunDir(str(tmp_path))
    params = {"base": "model: {}\n", "root": str(tmp_path), "eval_tasks": ["review"],
              "fractions": [0.1, 1.0], "seeds": [0, 1], "baseline": None,
              "point": {"label": "2 tasks", "tasks": ["a", "b"], "settings": {}}}
    rows = [{"point": "2 tasks", "test": 0.5}]
    root.write_text("2-tasks-results.json", json.dumps(rows))
    assert kept_rows(root, "2-tasks", params) is None  # (results without params: unfinished)
    root.write_text("2-tasks-params.json", json.dumps(params))
    assert kept_rows(root, "2-tasks", params) == rows
    for key, value in [("seeds", [0, 1, 2]), ("fractions", [0.1]), ("base", "model: {x: 1}\n"),
                       ("point", {**params["point"], "tasks": ["b", "a"]})]:
        assert kept_rows(root, "2-tasks", {**params, key: value}) is None, key
