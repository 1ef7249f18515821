"""Ray Tune sweeps: the paper's ablations and fine-tuning hyperparameter search.

`sweep_points` (tasks, batching, loss-scaling, mixing): every Tune trial is one point on the
axis — a number of pre-finetuning tasks, a batching strategy, loss scaling on or off, a mixing
rule. A trial is a Tune driver function (the Ray Train V2 pattern): it runs one pre-finetuning
run (a `TorchTrainer`, reporting to Tune through `TuneReportCallback`), then fine-tunes every
eval task x fraction x seed from it. Point 0 of the task-count axis is the baseline: the plain
backbone, fine-tuned the same way. Task sets are nested by construction: a seeded order of the
pool, and each count takes its first tasks.

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
import os
import random
import re
import statistics
from dataclasses import asdict

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
from muppet_ray.runtime import quiet_tune_console, start_ray, verbose
from muppet_ray.storage import RunDir, run_root, write_rows
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import resolve_tasks

AXES = {  # axis -> (config key it sets, values swept by default)
    "batching": ("batching.strategy", ["heterogeneous", "homogeneous", "sequential"]),
    "loss-scaling": ("training.loss_scaling", [True, False]),
    "mixing": ("mixture.rule", ["proportional", "temperature", "uniform"]),
}
MOST_LISTED = 6  # a sweep step adding more pool tasks than this cannot say which one moved a task


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


# ------------------------------------------------------------------- ablation sweeps


def sweep_points(base: Config, axis: str, eval_tasks: list[str], fractions: list[float],
                 seeds: list[int], counts: list[int] | None = None,
                 values: list | None = None, task_seed: int = 0,
                 max_concurrent: int | None = None, report: str | None = None,
                 command: str = "") -> list[dict]:
    """Run the sweep over `axis` ('tasks' or one of AXES); returns one row per fine-tuning run
    (and one per failed trial), also written as results.json/csv, plots and summary.md (and
    to `report`, see write_results)."""
    check_fractions(fractions)
    pool = [t.name for t in resolve_tasks(base)]  # the mixture: tasks.include or the default
    overlap = sorted(set(eval_tasks) & set(pool))
    if overlap:
        raise ConfigError(f"--eval-tasks {overlap} are in the pre-finetuning pool: an eval task "
                          "must never be pre-finetuned on (leave it out of tasks.include)")
    resolve_tasks(base.replace({"tasks.include": eval_tasks}))  # unknown eval task: fail now
    name = base.run.name or f"sweep-{axis}"
    root = run_root(base, name)
    if axis == "tasks":
        order, sets = nested_task_sets(pool, counts or [0, len(pool)], task_seed)
        points = [{"label": f"{c} tasks", "axis_value": c, "tasks": tasks, "settings": {}}
                  for c, tasks in sets.items()]
        root.write_text("task_order.json", json.dumps({"seed": task_seed, "order": order}))
    elif axis in AXES:
        key, default = AXES[axis]
        points = [{"label": f"{key}={v}", "axis_value": v, "tasks": pool,
                   "settings": {key: v}} for v in (values or default)]
    else:
        raise ConfigError(f"sweep axis {axis!r}: expected 'tasks' or one of {sorted(AXES)}")
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
    rows = collect(root, [p["label"] for p in points], errors)
    write_results(root, rows, axis, report, command)
    failed = [r for r in rows if "error" in r]
    if failed:  # (after the results of the others are written)
        raise TrainingError(f"{len(failed)} of {len(points)} sweep points failed: " + "; ".join(
            f"{r['point']}: {r['error']}" for r in failed) + f" (results: {root.root})")
    return rows


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
    tasks by the fine-tuning protocol (protocol.py)."""
    base, point = parse_config(params["base"]), params["point"]
    root, slug = RunDir(params["root"]), _slug(point["label"])
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
    rows = [{"point": point["label"], "axis_value": point["axis_value"],
             "tasks": len(point["tasks"]), **asdict(s)} for s in scores]
    root.write_text(f"{slug}-results.json", json.dumps(rows, indent=2))
    print(f"[muppet-ray] sweep point {point['label']}: {len(rows)} fine-tuning runs done",
          flush=True)
    values = [s.test for s in protocol.chosen(scores) if math.isfinite(s.test)]
    tune.report({"point": point["label"], "runs": len(rows),
                 "mean_test": statistics.mean(values) if values else math.nan})


def _run_tune(trainable, params: dict, root: RunDir, base: Config,
              max_concurrent: int | None, tune_config: dict | None = None):
    """Fit a Tuner over `params`, or restore it from `<root>/tune` after the driver died."""
    per_trial = base.scaling.max_workers * base.scaling.cpus_per_worker
    if max_concurrent is None:  # trials whose workers fit the cluster at once
        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // (per_trial + 1)))
    if not verbose():
        quiet_tune_console()
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


def collect(root: RunDir, labels: list[str], errors: dict[str, str]) -> list[dict]:
    """Every point's fine-tuning rows; a failed point gives one row with its error."""
    rows = []
    for label in labels:
        slug = _slug(label)
        if label not in errors and root.exists(f"{slug}-results.json"):
            rows += json.loads(root.read_text(f"{slug}-results.json"))
        else:
            rows.append({"point": label, "error": errors.get(label, "no results")})
    return rows


def _error_line(error: BaseException) -> str:
    """The error's last non-empty line (where Ray's wrapped errors say what went wrong)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


# ------------------------------------------------------------------------ results


def write_results(root: RunDir, rows: list[dict], axis: str, report: str | None = None,
                  command: str = "") -> None:
    """results.json/csv (every fine-tuning run), plots/ and summary.md; with `report`, the
    summary also as that markdown file (dated, with the commit and command) and its plot
    beside it."""
    columns = ["point", "axis_value", "tasks", "task", "metric", "fraction", "seed",
               "learning_rate", "validation", "test", "train_examples", "steps", "head",
               "device", "error"]
    write_rows(root, rows, columns)
    order = (json.loads(root.read_text("task_order.json"))["order"]
             if axis == "tasks" and root.exists("task_order.json") else [])
    plots = plot(root, rows, axis)
    root.write_text("summary.md", summary(rows, axis, plots, order))
    print("\n" + summary(rows, axis, plots, order), flush=True)
    if report:
        _write_report(root, rows, axis, order, report, command, plots)


def _scores(rows: list[dict]) -> list[protocol.Score]:
    fields = protocol.Score.__dataclass_fields__
    return [protocol.Score(**{**{k: r[k] for k in fields if k in r}, "model": r["point"]})
            for r in rows if "error" not in r]


def _test_means(rows: list[dict]) -> dict[tuple, float]:
    """(task, point, fraction) -> mean test score over seeds, at the chosen learning rate."""
    groups: dict[tuple, list[float]] = {}
    for s in protocol.chosen(_scores(rows)):
        groups.setdefault((s.task, s.model, s.fraction), []).append(s.test)
    return {k: statistics.mean(v) for k, v in groups.items()}


def summary(rows: list[dict], axis: str, plots: list[str], order: list[str] = ()) -> str:
    means = _test_means(rows)
    points = list(dict.fromkeys(r["point"] for r in rows))
    seeds = len({r["seed"] for r in rows if "error" not in r})
    lines = [f"# Sweep over {axis}", "",
             f"Test scores x100 (mean over {seeds} seeds) at the fine-tuning learning rate "
             "chosen on validation.", "",
             "| eval task | fraction | " + " | ".join(points) + " |",
             "|---|---|" + "---|" * len(points)]
    for task, fraction in sorted(dict.fromkeys((t, f) for t, _, f in means)):
        cells = [f"{100 * means[(task, p, fraction)]:.1f}" if (task, p, fraction) in means
                 else "-" for p in points]
        lines.append(f"| {task} | {fraction:g} | " + " | ".join(cells) + " |")
    baseline = next((r["point"] for r in rows if "error" not in r
                     and (axis != "tasks" or r["tasks"] == 0)), None)
    found = protocol.differences(_scores(rows), baseline) if baseline else []
    if found:
        tasks = list(dict.fromkeys(d.task for d in found if d.task != "mean"))
        lines += ["", f"Paired difference to {baseline!r} in points (same subsets and seeds): "
                  "mean ± 95% interval over seeds; **bold** where the interval excludes 0.", "",
                  "| model | fraction | mean over tasks | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        cell = {(d.model, d.task, d.fraction): d for d in found}
        for model, fraction in dict.fromkeys((d.model, d.fraction) for d in found):
            cells = [_cell(cell.get((model, t, fraction))) for t in ["mean", *tasks]]
            lines.append(f"| {model} | {fraction:g} | " + " | ".join(cells) + " |")
    if axis == "tasks" and order and means:
        lines += ["", *moved_most(rows, order)]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed trials:"] + [f"- {r['point']}: {r['error']}" for r in failed]
    lines += ["", "Plots: " + ", ".join(plots)] if plots else []
    return "\n".join(lines) + "\n"


def _cell(d: protocol.Difference | None) -> str:
    if d is None:
        return "-"
    text = f"{d.mean:+.1f} ± {d.half_width:.1f}"
    return f"**{text}**" if d.significant else text


def moved_most(rows: list[dict], order: list[str]) -> list[str]:
    """Per eval task, the step of the nested task sets that moved its test score most (at the
    largest fraction), and the pool tasks that step added (by name where there are few enough
    for the step to say which one did it)."""
    means = _test_means(rows)
    counts = {r["point"]: r["tasks"] for r in rows if "error" not in r}
    fraction = max(f for _, _, f in means)
    lines = ["Which pool tasks' inclusion moved each eval task most (consecutive points, "
             f"fraction {fraction:g}):", "", "| eval task | tasks added | change (points) |",
             "|---|---|---|"]
    for task in sorted({t for t, _, _ in means}):
        curve = sorted((counts[p], v) for (t, p, f), v in means.items()
                       if t == task and f == fraction)
        steps = [(b[1] - a[1], a[0], b[0]) for a, b in zip(curve, curve[1:])]
        if steps:
            change, low, high = max(steps, key=lambda s: abs(s[0]))
            added = (", ".join(order[low:high]) if high - low <= MOST_LISTED else
                     f"tasks {low + 1} to {high} of task_order.json, all at once (counts in "
                     "between would tell them apart)")
            lines.append(f"| {task} | {added} | {100 * change:+.1f} |")
    return lines


def _write_report(root: RunDir, rows: list[dict], axis: str, order: list[str], report: str,
                  command: str, plots: list[str]) -> None:
    import datetime
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stem = os.path.splitext(os.path.basename(report))[0]
    directory = os.path.dirname(os.path.abspath(report))
    os.makedirs(directory, exist_ok=True)
    images = []
    for path in plots:
        images.append(f"{stem}-{os.path.basename(path)}")
        with root.open_input(path) as f, open(os.path.join(directory, images[-1]), "wb") as out:
            out.write(f.read())
    body = summary(rows, axis, [], order).split("\n", 1)[1]
    text = (f"# Results: sweep over {axis}\n\n"
            f"Measured {datetime.date.today().isoformat()} at commit `{commit}` with:\n\n"
            f"```\n{command}\n```\n{body}\n"
            + "".join(f"![{name}]({name})\n" for name in images))
    with open(report + ".part", "w") as f:  # (no half-written report)
        f.write(text)
    os.replace(report + ".part", report)
    print(f"[muppet-ray] report: {report}", flush=True)


def plot(root: RunDir, rows: list[dict], axis: str) -> list[str]:
    """PNG: the test score against the axis (one line per eval task and fraction; along the
    task count, the plain backbone's score dashed) and the mean paired difference to the
    baseline with its 95% interval."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = _test_means(rows)
    if not means:
        return []
    values = {r["point"]: r["axis_value"] for r in rows if "error" not in r}
    tasks = sorted({t for t, _, _ in means})
    fractions = sorted({f for _, _, f in means})
    with tempfile.TemporaryDirectory() as local:
        figure, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 4),
                                    squeeze=False)
        for ax, fraction in zip(axes[0], fractions):
            for task in tasks:
                points = sorted((values[p], 100 * v) for (t, p, f), v in means.items()
                                if t == task and f == fraction)
                xs = [x if axis == "tasks" else str(x) for x, _ in points]
                line = ax.plot(xs, [v for _, v in points], marker="o", label=task)[0]
                if axis == "tasks" and points and points[0][0] == 0:
                    ax.axhline(points[0][1], color=line.get_color(), linestyle="--", alpha=0.5)
            ax.set_title(f"training fraction {fraction:g}")
            ax.set_xlabel("pre-finetuning tasks (0 = plain backbone, dashed)"
                          if axis == "tasks" else axis)
            ax.set_ylabel("test score x100 (mean over seeds)")
        axes[0][-1].legend(fontsize=7)
        figure.tight_layout()
        name = f"{axis}_curve.png"
        figure.savefig(f"{local}/{name}", dpi=100)
        plt.close("all")
        root.upload(local, "plots")
    return [f"plots/{name}"]


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
