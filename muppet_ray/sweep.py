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
the rest of the sweep goes on.
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

from muppet_ray.config import Config, parse_config, to_yaml, validate
from muppet_ray.errors import ConfigError
from muppet_ray.finetune import (
    Source,
    check_fractions,
    finetune,
    finetune_config,
    initial_weights,
    resolve_source,
)
from muppet_ray.storage import RunDir, normalize
from muppet_ray.tasks import resolve_tasks

AXES = {  # axis -> (config key it sets, values swept by default)
    "batching": ("batching.strategy", ["heterogeneous", "homogeneous", "sequential"]),
    "loss-scaling": ("training.loss_scaling", [True, False]),
    "mixing": ("mixture.rule", ["proportional", "temperature", "uniform"]),
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


def _with(config: Config, **settings) -> Config:
    """A copy of `config` with `section.key` (written section__key) settings."""
    raw = config.model_dump(mode="json")
    for key, value in settings.items():
        section, name = key.split("__")
        raw[section][name] = value
    return validate(raw)


# ------------------------------------------------------------------- ablation sweeps


def sweep_points(base: Config, axis: str, eval_tasks: list[str], fractions: list[float],
                 seeds: list[int], counts: list[int] | None = None,
                 values: list | None = None, task_seed: int = 0,
                 max_concurrent: int | None = None) -> list[dict]:
    """Run the sweep over `axis` ('tasks' or one of AXES); returns one row per fine-tuning run
    (and one per failed trial), also written as results.json/csv, plots and summary.md."""
    from muppet_ray.prefinetune import start_ray

    check_fractions(fractions)
    pool = [t.name for t in resolve_tasks(base)]  # the mixture: tasks.include or the default
    overlap = sorted(set(eval_tasks) & set(pool))
    if overlap:
        raise ConfigError(f"--eval-tasks {overlap} are in the pre-finetuning pool: an eval task "
                          "must never be pre-finetuned on (leave it out of tasks.include)")
    resolve_tasks(_with(base, tasks__include=eval_tasks))  # unknown eval task: fail now
    name = base.run.name or f"sweep-{axis}"
    root = RunDir(f"{normalize(base.run.storage_path)}/{name}")
    if axis == "tasks":
        order, sets = nested_task_sets(pool, counts or [0, len(pool)], task_seed)
        points = [{"label": f"{c} tasks", "axis_value": c, "tasks": tasks, "settings": {}}
                  for c, tasks in sets.items()]
        root.write_text("task_order.json", json.dumps({"seed": task_seed, "order": order}))
    elif axis in AXES:
        key, default = AXES[axis]
        points = [{"label": f"{key}={v}", "axis_value": v, "tasks": pool,
                   "settings": {key.replace(".", "__"): v}} for v in (values or default)]
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
    errors = {r.config["point"]["label"]: _first_line(r.error) for r in grid if r.error}
    rows = collect(root, [p["label"] for p in points], errors)
    write_results(root, rows, axis)
    return rows


def _baseline_model(base: Config, pool: list[str], root: RunDir) -> str:
    """The plain backbone for the 0-task point: `model.pretrained`, or weights built from
    scratch as a pre-finetuning run would start (with the tokenizer such a run trains)."""
    if base.model.pretrained is not None:
        return base.model.pretrained
    from muppet_ray.prefinetune import build_tokenizer

    tokenizer = build_tokenizer(base, resolve_tasks(_with(base, tasks__include=pool)))
    return initial_weights(base, tokenizer, root.root)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def _point_trial(params: dict) -> None:
    """One Tune trial: pre-finetune at this point of the axis, then fine-tune the eval tasks."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from muppet_ray.prefinetune import prefinetune

    base, point = parse_config(params["base"]), params["point"]
    root, slug = RunDir(params["root"]), _slug(point["label"])
    if point["tasks"]:
        config = _with(base, tasks__include=point["tasks"], run__storage_path=root.root,
                       run__name=f"{slug}-prefinetune", **point["settings"])
        run = prefinetune(config, callbacks=[TuneReportCallback()])
        source = resolve_source(run.run_dir, root.uri(slug))
    else:
        source = Source("plain backbone", params["baseline"])
    rows = []
    for task in params["eval_tasks"]:
        for fraction in params["fractions"]:
            for seed in params["seeds"]:
                config = finetune_config(base, source, task, fraction, seed, root.root,
                                         f"{slug}-{task}-f{fraction:g}-s{seed}")
                result = finetune(config, source, role=point["label"])
                rows.append({"point": point["label"], "axis_value": point["axis_value"],
                             "tasks": len(point["tasks"]), **asdict(result)})
                root.write_text(f"{slug}-results.json", json.dumps(rows, indent=2))
    print(f"[muppet-ray] sweep point {point['label']}: {len(rows)} fine-tuning runs done",
          flush=True)
    values = [r["value"] for r in rows if math.isfinite(r["value"])]
    tune.report({"point": point["label"], "runs": len(rows),
                 "mean_value": statistics.mean(values) if values else math.nan})


def _run_tune(trainable, params: dict, root: RunDir, base: Config,
              max_concurrent: int | None, tune_config: dict | None = None):
    """Fit a Tuner over `params`, or restore it from `<root>/tune` after the driver died."""
    per_trial = base.scaling.max_workers * base.scaling.cpus_per_worker
    if max_concurrent is None:  # trials whose workers fit the cluster at once
        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // (per_trial + 1)))
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
                                      verbose=0))
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


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


# ------------------------------------------------------------------------ results


def write_results(root: RunDir, rows: list[dict], axis: str) -> None:
    import csv
    import io

    columns = ["point", "axis_value", "tasks", "task", "metric", "value", "chance", "seed",
               "fraction", "train_examples", "steps", "head", "run_dir", "error"]
    root.write_text("results.json", json.dumps(rows, indent=2))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    root.write_text("results.csv", text.getvalue())
    plots = plot(root, rows, axis)
    root.write_text("summary.md", summary(rows, axis, plots))
    print("\n" + summary(rows, axis, plots), flush=True)


def _means(rows: list[dict]) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["task"], r["point"], r["fraction"]), []).append(r["value"])
    return {k: statistics.mean(v) for k, v in groups.items()}


def summary(rows: list[dict], axis: str, plots: list[str]) -> str:
    means = _means(rows)
    points = list(dict.fromkeys(r["point"] for r in rows))
    lines = [f"# Sweep over {axis}", "", "Mean over seeds of each eval task's validation metric.",
             "", "| eval task | fraction | " + " | ".join(points) + " |",
             "|---|---|" + "---|" * len(points)]
    for task, fraction in dict.fromkeys((t, f) for t, _, f in means):
        cells = [f"{means[(task, p, fraction)]:.3f}" if (task, p, fraction) in means else "-"
                 for p in points]
        lines.append(f"| {task} | {fraction:g} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed trials:"] + [f"- {r['point']}: {r['error']}" for r in failed]
    lines += ["", "Plots: " + ", ".join(plots)] if plots else []
    return "\n".join(lines) + "\n"


def plot(root: RunDir, rows: list[dict], axis: str) -> list[str]:
    """PNG plots: metric vs the axis (one line per eval task, the 0-task baseline marked) and,
    with several fractions, metric vs fraction (one line per point and eval task)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = _means(rows)
    if not means:
        return []
    values = {r["point"]: r["axis_value"] for r in rows if "error" not in r}
    tasks = list(dict.fromkeys(t for t, _, _ in means))
    fractions = sorted({f for _, _, f in means})
    written = []
    with tempfile.TemporaryDirectory() as local:
        figure, ax = plt.subplots(figsize=(6, 4))
        for task in tasks:
            fraction = fractions[-1]
            points = [(values[p], means[(task, p, fraction)]) for (t, p, f) in means
                      if t == task and f == fraction]
            if axis == "tasks":
                points.sort()
                baseline = [v for x, v in points if x == 0]
                line = ax.plot([x for x, _ in points], [v for _, v in points], marker="o",
                               label=task)[0]
                if baseline:
                    ax.axhline(baseline[0], color=line.get_color(), linestyle="--", alpha=0.6)
            else:
                ax.plot([str(x) for x, _ in points], [v for _, v in points], marker="o",
                        label=task)
        metric = next(r["metric"] for r in rows if "error" not in r)
        ax.set_xlabel("pre-finetuning tasks (0 = plain backbone, dashed)" if axis == "tasks"
                      else axis)
        ax.set_ylabel(f"{metric} (fraction {fractions[-1]:g}, mean over seeds)")
        ax.legend()
        figure.tight_layout()
        name = f"{axis}_curve.png"
        figure.savefig(os.path.join(local, name), dpi=100)
        written.append(name)
        if len(fractions) > 1:
            figure, ax = plt.subplots(figsize=(6, 4))
            for task in tasks:
                for point in dict.fromkeys(p for t, p, _ in means if t == task):
                    xs = [f for f in fractions if (task, point, f) in means]
                    ax.plot(xs, [means[(task, point, f)] for f in xs], marker="o",
                            label=f"{task}, {point}")
            ax.set_xlabel("training fraction")
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
            figure.tight_layout()
            figure.savefig(os.path.join(local, "fractions.png"), dpi=100)
            written.append("fractions.png")
        plt.close("all")
        root.upload(local, "plots")
    return [f"plots/{name}" for name in written]


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
    from ray.tune.schedulers import ASHAScheduler

    from muppet_ray.prefinetune import start_ray
    from muppet_ray.task_types import TASK_TYPES

    space = parse_search(search)
    name = base.run.name or f"sweep-finetune-{task}"
    root = RunDir(f"{normalize(base.run.storage_path)}/{name}")
    source = resolve_source(given, root.root)
    steps = base.training.max_steps
    every = base.training.eval_every or max(1, steps // 4)
    base = _with(base, training__eval_every=every, training__checkpoint_every=steps)
    for key in space:  # a bad key fails here, not in every trial
        section, _, field = key.partition(".")
        if field not in type(getattr(base, section, None) or base).model_fields:
            raise ConfigError(f"--search {key!r}: unknown setting")
    kind = resolve_tasks(_with(base, tasks__include=[task]))[0].type
    metric = f"eval/{task}/{TASK_TYPES[kind].metric}"
    start_ray(base)
    params = {"base": to_yaml(base), "root": root.root, "task": task,
              "source": asdict(source), "space": space}
    scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace_steps or every,
                              reduction_factor=2)
    grid = _run_tune(_finetune_trial, params, root, base, max_concurrent,
                     {"metric": metric, "mode": "max", "scheduler": scheduler,
                      "num_samples": samples})
    rows = []
    for result in grid:
        row = {**result.config["space"], "status": "error" if result.error else "done",
               "steps": (result.metrics or {}).get("step"),
               "value": (result.metrics or {}).get(metric)}
        if result.error:
            row["error"] = _first_line(result.error)
        rows.append(row)
    best = grid.get_best_result(metric, "max", scope="last")
    report = {"metric": metric, "best": {**best.config["space"],
                                         "value": best.metrics.get(metric),
                                         "steps": best.metrics.get("step"),
                                         "run_dir": best.metrics.get("run_dir")},
              "trials": rows}
    root.write_text("best.json", json.dumps(report, indent=2, default=str))
    print(json.dumps(report["best"], indent=2, default=str), flush=True)
    return report


def _finetune_trial(params: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    settings = {k.replace(".", "__"): v for k, v in params["space"].items()}
    base = _with(parse_config(params["base"]), **settings)
    source = Source(**params["source"])
    trial = tune.get_context().get_trial_id()
    config = finetune_config(base, source, params["task"], base.tasks.train_fraction,
                             base.training.seed, params["root"], f"trial-{trial}")
    result = finetune(config, source, callbacks=[TuneReportCallback()])
    tune.report({"step": result.steps, "run_dir": result.run_dir,
                 f"eval/{result.task}/{result.metric}": result.value})
