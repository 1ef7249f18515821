"""Ray Tune sweeps: the paper's ablations and fine-tuning hyperparameter search.

`sweep_points` (tasks, batching, loss-scaling, mixing): every Tune trial is one point on the
axis — a number of pre-finetuning tasks, a batching strategy, loss scaling on or off, a mixing
rule. A trial is a Tune driver function (the Ray Train V2 pattern): it runs one pre-finetuning
run (a `TorchTrainer`, reporting to Tune through `TuneReportCallback`), then fine-tunes every
eval task x fraction x seed from it. Point 0 of the task-count axis is the baseline: the plain
backbone, fine-tuned the same way. Task sets are nested by construction: a seeded order of the
pool, and each count takes its first tasks. The task-count curve can also replicate its points
(`task_points`: further task orders, further pre-finetuning seeds) and ablate its largest count;
its pre-registered comparisons and their plot come from the stored results alone
(`report_from`, sweep_report.py).

`sweep_finetune`: trials are fine-tuning runs with sampled hyperparameters; ASHA stops the weak
ones early on their periodic validation metric.

Both keep Tune's state under `<storage>/<name>/tune`: run the same command again after the
driver dies and Tune restores the sweep; finished trials are not run again (and an unfinished
trial's Ray Train runs resume from their checkpoints). A failed trial is reported in the table,
the rest of the sweep goes on, and the command then fails, naming the points that failed.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import asdict
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from muppet_ray import protocol
from muppet_ray.config import Config, parse_config, to_yaml
from muppet_ray.errors import ConfigError, TrainingError
from muppet_ray.finetune import check_fractions, finetune, finetune_config
from muppet_ray.model_source import Source, initial_weights, resolve_source
from muppet_ray.prefinetune import build_tokenizer, prefinetune
from muppet_ray.runtime import (
    quiet_tune_console,
    start_ray,
    trials_keep_working_directory,
    verbose,
)
from muppet_ray.storage import RunDir, run_root
from muppet_ray.sweep_report import commit, scores_of, write_results
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import resolve_tasks

AXES = {  # axis -> (config key it sets, values swept by default)
    "batching": ("batching.strategy", ["heterogeneous", "homogeneous", "sequential"]),
    "loss-scaling": ("training.loss_scaling", [True, False]),
    "mixing": ("mixture.rule", ["proportional", "temperature", "uniform", "online"]),
}


def nested_task_sets(pool: list[str], counts: list[int], seed: int
                     ) -> tuple[list[str], dict[int, list[str]]]:
    """(the seeded order of the pool, count -> its first `count` tasks)."""
    if any(c < 0 for c in counts) or len(set(counts)) != len(counts):
        raise ConfigError(f"--counts: expected distinct task counts >= 0, got {counts}")
    if max(counts) > len(pool):
        raise ConfigError(f"--counts: {max(counts)} tasks asked for, but the pool has "
                          f"{len(pool)} ({pool})")
    order = list(pool)
    random.Random(seed).shuffle(order)
    return order, {c: order[:c] for c in sorted(counts)}


def task_points(pool: list[str], counts: list[int], task_seeds: list[int],
                prefinetune_seeds: list[int], training_seed: int,
                ablations: list[tuple[str, Any]]) -> tuple[dict[int, list[str]], list[dict]]:
    """The task-count sweep's points, and each task seed's order of the pool.

    The curve: each count's first tasks in the first seed's order ("N tasks"; 0 is the plain
    backbone); each further task seed again at every count strictly between 0 and the pool
    ("N tasks, order S": nested subsets of an order of its own); the largest count again at
    each pre-finetuning seed other than `training_seed` ("N tasks, seed S": training.seed);
    and the largest count with each ablation's one setting changed ("N tasks, key=value"),
    which is compared with "N tasks". Replicates ("order", "seed") of a count are averaged
    into its point of the curve; rows keep which point is which ("replicate", "ablation")."""
    if not task_seeds or len(set(task_seeds)) != len(task_seeds):
        raise ConfigError(f"--task-seed: expected distinct task seeds, got {task_seeds}")
    seeds = prefinetune_seeds or [training_seed]
    if len(set(seeds)) != len(seeds) or training_seed not in seeds:
        raise ConfigError(f"--prefinetune-seeds: expected distinct seeds, one of them "
                          f"training.seed ({training_seed}), the seed of every other point; got "
                          f"{seeds}")
    top = max(counts, default=0)
    if top == 0 and (len(seeds) > 1 or ablations):
        raise ConfigError("--prefinetune-seeds / --ablate replicate or change the largest count's "
                          "pre-finetuning: it needs a count above 0")
    orders, sets = {}, {}
    for seed in task_seeds:
        orders[seed], sets[seed] = nested_task_sets(pool, counts, seed)
    main = task_seeds[0]

    def point(label: str, count: int, tasks: list[str], settings: dict, order: int = main,
              seed: int = training_seed, replicate: str = "", ablation: str = "") -> dict:
        return {"label": label, "axis_value": count, "tasks": tasks, "settings": settings,
                "order": order, "prefinetune_seed": seed, "replicate": replicate,
                "ablation": ablation}

    points = [point(f"{c} tasks", c, tasks, {}) for c, tasks in sets[main].items()]
    points += [point(f"{c} tasks, order {s}", c, tasks, {}, order=s, replicate=f"order {s}")
               for s in task_seeds[1:] for c, tasks in sets[s].items() if 0 < c < len(pool)]
    points += [point(f"{top} tasks, seed {s}", top, sets[main][top], {"training.seed": s},
                     seed=s, replicate=f"seed {s}") for s in seeds if s != training_seed]
    for key, value in ablations:
        change = f"{key}={_text(value)}"
        points.append(point(f"{top} tasks, {change}", top, sets[main][top], {key: value},
                            ablation=change))
    return orders, points


def parse_ablations(base: Config, items: list[str]) -> list[tuple[str, Any]]:
    """`section.key=value` items -> (key, value), each a valid pre-finetuning setting that
    differs from `base`'s (an eval task is scored by `base`'s protocol whatever the point)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        section = key.split(".", 1)[0]
        if not sep or "." not in key:
            raise ConfigError(f"--ablate {item!r}: expected section.key=value")
        if section in ("protocol", "run") or key == "tasks.include":
            raise ConfigError(f"--ablate {item!r}: an ablation changes pre-finetuning; "
                              "the protocol, the run and the point's tasks are the sweep's")
        value = parse_value(text)
        changed = base.replace({key: value})  # (an unknown key or a bad value fails here)
        if changed == base:
            raise ConfigError(f"--ablate {item!r}: {key} is already {_text(value)}")
        if (key, value) in out:
            raise ConfigError(f"--ablate {item!r}: given twice")
        out.append((key, value))
    return out


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ------------------------------------------------------------------- ablation sweeps


def sweep_points(base: Config, axis: str, eval_tasks: list[str], fractions: list[float],
                 seeds: list[int], counts: list[int] | None = None,
                 values: list | None = None, task_seed: int | list[int] = 0,
                 max_concurrent: int | None = None, report: str | None = None,
                 command: str = "", prefinetune_seeds: list[int] | None = None,
                 ablate: list[str] | None = None) -> list[dict]:
    """Run the sweep over `axis` ('tasks' or one of AXES); returns one row per fine-tuning run
    (and one per failed trial), also written as results.json/csv, plots and summary.md (and
    to `report`, see write_results). Along 'tasks', further task seeds, pre-finetuning seeds
    and ablations add points (task_points)."""
    check_fractions(fractions)
    # the mixture: tasks.include or the default (not tasks.also: an --ablate adds those)
    pool = [t.name for t in resolve_tasks(base.replace({"tasks.also": []}))]
    overlap = sorted(set(eval_tasks) & set(pool))
    if overlap:
        raise ConfigError(f"--eval-tasks {overlap} are in the pre-finetuning pool: an eval task "
                          "must never be pre-finetuned on (leave it out of tasks.include)")
    resolve_tasks(base.replace({"tasks.include": eval_tasks}))  # unknown eval task: fail now
    name = base.run.name or f"sweep-{axis}"
    root = run_root(base, name)
    if axis == "tasks":
        task_seeds = [task_seed] if isinstance(task_seed, int) else task_seed
        orders, points = task_points(pool, counts or [0, len(pool)], task_seeds,
                                     prefinetune_seeds or [], base.training.seed,
                                     parse_ablations(base, ablate or []))
    elif axis in AXES:
        key, default = AXES[axis]
        points = [{"label": f"{key}={v}", "axis_value": v, "tasks": pool,
                   "settings": {key: v}} for v in (values or default)]
    else:
        raise ConfigError(f"sweep axis {axis!r}: expected 'tasks' or one of {sorted(AXES)}")
    if axis == "tasks":
        main = task_seeds[0]
        order_file = {"seed": main, "order": orders[main],
                      "orders": {str(seed): order for seed, order in orders.items()}}
        _check_orders(root, order_file)
    described = [_described(p) for p in points]
    commits = record_points(root, axis, described, command)
    if axis == "tasks":
        root.write_text("task_order.json", json.dumps(order_file))
    start_ray(base)
    baseline = None
    if any(not p["tasks"] for p in points):
        baseline = _baseline_model(base, pool, root)
    # The base config travels as YAML text, not a nested dict: Tune restores a sweep only with
    # the same param_space keys, and a setting added to Config would add a key.
    params = {"base": to_yaml(base), "root": root.root, "eval_tasks": eval_tasks,
              "fractions": fractions, "seeds": seeds, "baseline": baseline,
              "point": tune.grid_search(points)}
    grid = _run_tune(_point_trial, params, root, base, max_concurrent)
    errors = {r.config["point"]["label"]: _error_line(r.error) for r in grid if r.error}
    rows = collect(root, described, errors)
    write_results(root, rows, axis, report, command, commits)
    check_finished(rows, errors, root.root)  # (after the results of the others are written)
    return rows


def check_finished(rows: list[dict], errors: dict[str, str], where: str) -> None:
    """One line for points that failed, or else for points that did not finish (the sweep was
    stopped: the same command resumes it)."""
    points = list(dict.fromkeys(r["point"] for r in rows))
    failed = [point for point in points if point in errors]
    if failed:
        raise TrainingError(f"{len(failed)} of {len(points)} sweep points failed: " + "; ".join(
            f"{point}: {errors[point]}" for point in failed) + f" (results: {where})")
    unfinished = [r["point"] for r in rows if "error" in r]
    if unfinished:
        raise TrainingError(
            f"{len(unfinished)} of {len(points)} sweep points not finished (the sweep was "
            f"stopped; the same command resumes it): {', '.join(unfinished)} (results: {where})")


def _described(point: dict) -> dict:
    """What a point is, as its rows say it (without its task list)."""
    return {"point": point["label"], "axis_value": point["axis_value"],
            "tasks": len(point["tasks"]), "replicate": point.get("replicate", ""),
            "ablation": point.get("ablation", "")}


def record_points(root: RunDir, axis: str, points: list[dict], command: str) -> list[str]:
    """`sweep.json`: the sweep's axis, points (as _described), latest command and the commits
    it ran at, returned (what report_from reads). A sweep Tune can restore keeps its points:
    Tune would restore the old grid and silently leave out a point added to the command."""
    labels = [p["point"] for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sweep points: labels must be unique, got {labels}")
    saved = json.loads(root.read_text("sweep.json")) if root.exists("sweep.json") else {}
    before = [p["point"] for p in saved.get("points", points)]
    if before != labels and tune.Tuner.can_restore(root.uri("tune")):
        raise ConfigError(f"{root.root} is a sweep over the points {before}; this command asks "
                          f"for {labels}. Run it with the points it was started with, or give "
                          "it another run.name")
    commits = saved.get("commits", [])
    if commit() not in commits:
        commits.append(commit())
    root.write_text("sweep.json", json.dumps({"axis": axis, "points": points, "command": command,
                                              "commits": commits}, indent=2))
    return commits


def _check_orders(root: RunDir, new: dict) -> None:
    """A sweep Tune can restore keeps its task orders (its trials keep their task sets)."""
    if root.exists("task_order.json") and tune.Tuner.can_restore(root.uri("tune")):
        old = json.loads(root.read_text("task_order.json"))
        if old["order"] != new["order"] or old.get("orders", new["orders"]) != new["orders"]:
            raise ConfigError(f"{root.root} was started with other task orders (its "
                              "task_order.json): keep --task-seed and tasks.include as they "
                              "were, or give it another run.name")


def _baseline_model(base: Config, pool: list[str], root: RunDir) -> str:
    """The plain backbone for the 0-task point: `model.pretrained`, or weights built from
    scratch as a pre-finetuning run would start (with the tokenizer such a run trains)."""
    if base.model.pretrained is not None:
        return base.model.pretrained
    tokenizer = build_tokenizer(base, resolve_tasks(base.replace({"tasks.include": pool})))
    return initial_weights(base, tokenizer, root.root)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def _point_trial(params: dict) -> None:
    """One Tune trial: pre-finetune at this point of the axis, then score the model on the eval
    tasks by the fine-tuning protocol (protocol.py). A point that finished before with the same
    params keeps its results, even where Tune's own state was lost (a new machine given only
    the sweep's small result files: docs/finetune-and-sweeps.md)."""
    root, point = RunDir(params["root"]), params["point"]
    slug = _slug(point["label"])
    rows = kept_rows(root, slug, params)
    if rows is None:
        rows = _run_point(params, root, slug)
        root.write_text(f"{slug}-results.json", json.dumps(rows, indent=2))
        # (written after the results: a point with its params file is complete)
        root.write_text(f"{slug}-params.json", json.dumps(params, indent=2, sort_keys=True))
        print(f"[muppet-ray] sweep point {point['label']}: {len(rows)} fine-tuning runs done",
              flush=True)
    else:
        print(f"[muppet-ray] sweep point {point['label']}: kept its {len(rows)} stored "
              "fine-tuning runs (the same point finished before)", flush=True)
    values = [s.test for s in protocol.chosen(scores_of(rows)) if math.isfinite(s.test)]
    tune.report({"point": point["label"], "runs": len(rows),
                 "mean_test": statistics.mean(values) if values else math.nan})


def kept_rows(root: RunDir, slug: str, params: dict) -> list[dict] | None:
    """The stored rows of a point that finished with exactly these trial params (its base
    config, eval tasks, fractions, seeds and point), else None."""
    if not root.exists(f"{slug}-params.json") or not root.exists(f"{slug}-results.json"):
        return None
    if json.loads(root.read_text(f"{slug}-params.json")) != json.loads(json.dumps(params)):
        return None
    return json.loads(root.read_text(f"{slug}-results.json"))


def _run_point(params: dict, root: RunDir, slug: str) -> list[dict]:
    """Pre-finetune the point's model (none for 0 tasks) and score it: the point's rows."""
    base, point = parse_config(params["base"]), params["point"]
    # The storage root is where the sweep's directory is (storage.run_root), made absolute by
    # the driver: Tune runs each trial in a working directory of its own, new in each Ray
    # session, where a relative run.storage_path would put the protocol's scores and the chunk
    # cache, and a sweep restored in a new session would not find them again.
    base = base.replace({"run.storage_path": root.root.rsplit("/", 1)[0]})
    if point["tasks"]:
        # (points of sweeps started before 2026-12 wrote their settings as section__key)
        settings = {key.replace("__", "."): v for key, v in point["settings"].items()}
        config = base.replace({"tasks.include": point["tasks"], "run.storage_path": root.root,
                               "run.name": f"{slug}-prefinetune", **settings})
        run = prefinetune(config, callbacks=[TuneReportCallback()])
        source = resolve_source(run.run_dir, root.uri(slug))
    else:
        source = Source("plain backbone", params["baseline"])
    scores = protocol.score_model(base, source, point["label"], params["eval_tasks"],
                                  params["fractions"], params["seeds"], root.uri(slug))
    # (points of sweeps started before 2026-12 have no order, seed, replicate or ablation)
    extra = {k: point[k] for k in ("order", "prefinetune_seed", "replicate", "ablation")
             if k in point}
    return [{"point": point["label"], "axis_value": point["axis_value"],
             "tasks": len(point["tasks"]), **extra, **asdict(s)} for s in scores]


def _run_tune(trainable, params: dict, root: RunDir, base: Config,
              max_concurrent: int | None, tune_config: dict | None = None):
    """Fit a Tuner over `params`, or restore it from `<root>/tune` after the driver died."""
    per_trial = base.scaling.max_workers * base.scaling.cpus_per_worker
    if max_concurrent is None:  # trials whose workers fit the cluster at once
        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // (per_trial + 1)))
    if not verbose():
        quiet_tune_console()
    trials_keep_working_directory()
    # The trial itself only drives Ray Train runs, whose workers hold the resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    path = root.uri("tune")
    if tune.Tuner.can_restore(path):
        print(f"[muppet-ray] restoring the sweep in {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=params)
    else:
        tuner = tune.Tuner(
            trainable, param_space=params,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                        **(tune_config or {})),
            run_config=tune.RunConfig(name="tune", storage_path=root.root,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      # Tune's state reaches object storage every 5 s, not 300:
                                      # a restored sweep then knows its finished points.
                                      sync_config=tune.SyncConfig(sync_period=5), verbose=0))
    return tuner.fit()


def collect(root: RunDir, points: list[dict], errors: dict[str, str]) -> list[dict]:
    """Every point's fine-tuning rows; a point that failed or has not finished gives one row
    (what _described says of it) with its error."""
    rows = []
    for point in points:
        label = point["point"]
        if label not in errors and root.exists(f"{_slug(label)}-results.json"):
            rows += json.loads(root.read_text(f"{_slug(label)}-results.json"))
        else:
            rows.append({**point, "error": errors.get(label, "no results")})
    return rows


def report_from(run_dir: str, report: str | None = None) -> list[dict]:
    """Rewrite a sweep's results.json/csv, plots and summary.md (and `report`) from what its
    points stored (their <point>-results.json), without Ray: the finished points, and one row
    for each point that has not finished (or failed). A sweep started before 2026-12 (no
    sweep.json) is read from its results.json."""
    root = RunDir(run_dir)
    if root.exists("sweep.json"):
        saved = json.loads(root.read_text("sweep.json"))
        axis, command, commits = saved["axis"], saved["command"], saved["commits"]
        rows = collect(root, saved["points"], {})
    elif root.exists("results.json"):
        rows = json.loads(root.read_text("results.json"))
        axis = "tasks" if root.exists("task_order.json") else next(
            (a for a, (key, _) in AXES.items() if rows and rows[0]["point"].startswith(key)),
            "tasks")
        command, commits = "(not recorded: a sweep from before sweep.json)", None
    else:
        raise ConfigError(f"{run_dir}: no sweep.json or results.json (not a sweep directory?)")
    write_results(root, rows, axis, report, command, commits)
    return rows


def _error_line(error: BaseException) -> str:
    """The error's last non-empty line (where Ray's wrapped errors say what went wrong)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


# ---------------------------------------------------------- fine-tuning hyperparameters


SEARCH = re.compile(r"^(\w+\.\w+)=(loguniform|uniform|choice|grid)\((.*)\)$")


def parse_search(items: list[str]) -> dict:
    """`section.key=loguniform(a,b)|uniform(a,b)|choice(v,...)|grid(v,...)` -> Tune spaces."""
    space = {}
    for item in items:
        match = SEARCH.match(item.replace(" ", ""))
        if not match:
            raise ConfigError(f"--search {item!r}: expected section.key=loguniform(a,b), "
                              "uniform(a,b), choice(v,...) or grid(v,...)")
        key, kind, args = match.groups()
        values = [parse_value(v) for v in args.split(",") if v]
        if kind in ("loguniform", "uniform") and len(values) != 2:
            raise ConfigError(f"--search {item!r}: {kind} takes two bounds")
        space[key] = {"loguniform": lambda v: tune.loguniform(*v),
                      "uniform": lambda v: tune.uniform(*v),
                      "choice": tune.choice, "grid": tune.grid_search}[kind](values)
    return space


def parse_value(text: str):
    """A number (1e-5 included, which YAML reads as text), else YAML."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def sweep_finetune(base: Config, given: str, task: str, search: list[str], samples: int = 4,
                   grace_steps: int | None = None, max_concurrent: int | None = None) -> dict:
    """Search fine-tuning hyperparameters of `task` from `given`, ASHA stopping weak trials
    on their validation metric (evaluated every `training.eval_every` steps). Returns the best
    trial's settings, metric and run directory (written to best.json too)."""
    space = parse_search(search)
    name = base.run.name or f"sweep-finetune-{task}"
    root = run_root(base, name)
    source = resolve_source(given, root.root)
    steps = base.training.max_steps
    every = base.training.eval_every or max(1, steps // 4)
    base = base.replace({"training.eval_every": every, "training.checkpoint_every": steps})
    for key in space:  # a bad key fails here, not in every trial
        section, _, field = key.partition(".")
        if field not in type(getattr(base, section, None) or base).model_fields:
            raise ConfigError(f"--search {key!r}: unknown setting")
    kind = resolve_tasks(base.replace({"tasks.include": [task]}))[0].type
    metric = f"eval/{task}/{TASK_TYPES[kind].metric}"
    start_ray(base)
    params = {"base": to_yaml(base), "root": root.root, "task": task,
              "source": asdict(source), "space": space}
    scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace_steps or every,
                              reduction_factor=2)
    grid = _run_tune(_finetune_trial, params, root, base, max_concurrent,
                     {"metric": metric, "mode": "max", "scheduler": scheduler,
                      "num_samples": samples})
    if all(result.error for result in grid):
        raise TrainingError(f"every trial of {root.root!r} failed: "
                            + "; ".join(_error_line(result.error) for result in grid))
    rows = []
    for result in grid:
        row = {**result.config["space"], "status": "error" if result.error else "done",
               "steps": (result.metrics or {}).get("step"),
               "value": (result.metrics or {}).get(metric)}
        if result.error:
            row["error"] = _error_line(result.error)
        rows.append(row)
    best = grid.get_best_result(metric, "max", scope="last")
    report = {"metric": metric, "best": {**best.config["space"],
                                         "value": best.metrics.get(metric),
                                         "steps": best.metrics.get("step"),
                                         "run_dir": best.metrics.get("run_dir")},
              "trials": rows}
    root.write_text("best.json", json.dumps(report, indent=2, default=str))
    print(json.dumps(report["best"], indent=2, default=str), flush=True)
    failed = [row for row in rows if "error" in row]
    if failed:  # (after best.json: the trials that ran are kept)
        raise TrainingError(f"{len(failed)} of {len(rows)} trials failed: " + "; ".join(
            row["error"] for row in failed) + f" (results: {root.uri('best.json')})")
    return report


def _finetune_trial(params: dict) -> None:
    base = parse_config(params["base"]).replace(params["space"])
    source = Source(**params["source"])
    trial = tune.get_context().get_trial_id()
    config = finetune_config(base, source, params["task"], base.tasks.train_fraction,
                             base.training.seed, params["root"], f"trial-{trial}")
    result = finetune(config, source, callbacks=[TuneReportCallback()])
    tune.report({"step": result.steps, "run_dir": result.run_dir,
                 f"eval/{result.task}/{result.metric}": result.value})
