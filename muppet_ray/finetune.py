"""Fine-tuning and evaluation, starting from a pre-finetuned model (or a plain one).

A fine-tuning run is a pre-finetuning run (prefinetune.py: same Ray Data, Ray Train and
DeepSpeed code) on one task, whose backbone is the source model (model_source.py) and whose head
starts from the source's trained head where there is one (heads.py).

`compare` runs the grid the paper's sample-efficiency study needs: for each source (the
pre-finetuned model, and the backbone it started from as the baseline), each training fraction
(nested subsets) and each seed, one run; it writes every run's `results.json` and one summary.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass

import yaml

from muppet_ray.config import Config, ModelConfig, expand_variables, to_yaml
from muppet_ray.errors import ConfigError
from muppet_ray.export import AUTO_CLASSES, MAPPABLE_BACKBONES, to_transformers
from muppet_ray.heads import initial_heads
from muppet_ray.model_source import Source, baseline_source, resolve_source
from muppet_ray.prefinetune import changed_settings, launch, resolve_and_check
from muppet_ray.storage import RunDir, run_root, write_rows
from muppet_ray.tasks import Task, resolve_tasks

# --------------------------------------------------------------------------- running


@dataclass
class FinetuneResult:
    task: str
    metric: str
    value: float
    chance: float | None
    seed: int
    fraction: float
    train_examples: int
    steps: int
    source: str  # the --from value (or the baseline's)
    role: str  # "pre-finetuned" or "baseline"
    head: str  # "new", or the source task whose head it started from
    run_dir: str
    hf_model: str  # transformers task model directory ("" where no Auto class fits)
    metrics: dict


def finetune_config(base: Config, source: Source, task: str, fraction: float, seed: int,
                    storage: str, name: str, like: Source | None = None) -> Config:
    """The config of one run. Model settings the user left unset (max_length, doc_stride, ...)
    come from the pre-finetuning run of `like` (default: `source`), so inputs are cut alike."""
    changes = {}
    manifest = (like or source).manifest
    if manifest:
        trained = expand_variables(yaml.safe_load(manifest["config"])).get("model", {})
        changes = {f"model.{key}": trained[key] for key in sorted(
            ModelConfig.model_fields.keys() - base.model.model_fields_set) if key in trained}
    return base.replace({**changes, "model.pretrained": source.model, "tasks.include": [task],
                         "tasks.train_fraction": fraction, "training.seed": seed,
                         "run.storage_path": storage, "run.name": name})


def finetune(config: Config, source: Source, head: str = "auto", role: str = "pre-finetuned",
             callbacks: list | None = None) -> FinetuneResult:
    """One fine-tuning run: `config` names one task in tasks.include. A run that already
    finished with this config is not run again: its results.json is the result."""
    done = run_root(config, config.run.name)
    if done.exists("results.json") and done.exists("config.yaml") and not changed_settings(
            done.read_text("config.yaml"), to_yaml(config)):
        return FinetuneResult(**json.loads(done.read_text("results.json")))
    tasks = resolve_and_check(config)
    if len(tasks) != 1:
        raise ConfigError(f"tasks.include: fine-tuning takes one task, got {len(tasks)}")
    task = tasks[0]
    heads, origin = initial_heads(source, tasks, head)
    run = launch(config, "finetune", initial_heads=heads, callbacks=callbacks)
    metric = task.task_type.metric
    after = run.after.get(task.name, {})
    hf_model = _transformers_copy(run.export_dir, task, f"{run.run_dir}/hf")
    result = FinetuneResult(
        task.name, metric, after.get(metric, math.nan), after.get("chance"),
        config.training.seed, config.tasks.train_fraction, run.train_examples[task.name],
        config.training.max_steps, source.given, role, origin[task.name], run.run_dir,
        hf_model, after)
    RunDir(run.run_dir).write_text("results.json", json.dumps(asdict(result), indent=2))
    return result


def _transformers_copy(export_uri: str, task: Task, out_uri: str) -> str:
    """The run's model as a `transformers` task model, where an Auto class fits its head."""
    if task.type not in AUTO_CLASSES:
        return ""
    config = json.loads(RunDir(export_uri).read_text("config.json"))
    if config.get("model_type") not in MAPPABLE_BACKBONES:
        return ""
    to_transformers(export_uri, task.name, out_uri)
    return RunDir(out_uri).root


def check_fractions(fractions: list[float]) -> None:
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fractions: each fraction must be in (0, 1], got {fraction}")


def compare(base: Config, given: str, task: str, fractions: list[float], seeds: list[int],
            baseline: str | None = None, head: str = "auto") -> list[FinetuneResult]:
    """Fine-tune `task` from `given` (and from a baseline) on each fraction and seed."""
    check_fractions(fractions)
    name = base.run.name or f"finetune-{task}"
    root = run_root(base, name)
    source = resolve_source(given, root.root)
    sources = [(source, "pre-finetuned")]
    if baseline:
        other = (baseline_source(source, root.root) if baseline == "auto"
                 else resolve_source(baseline, root.root))
        sources.append((other, "baseline"))
    probe = finetune_config(base, source, task, fractions[0], seeds[0], root.root, "-")
    initial_heads(source, resolve_tasks(probe), head)  # bad --head: fail before any run
    results = []
    for src, role in sources:
        for fraction in fractions:
            for seed in seeds:
                run_name = f"{role}-f{fraction:g}-s{seed}"
                config = finetune_config(base, src, task, fraction, seed, root.root, run_name,
                                         like=source)
                results.append(finetune(config, src, head if role != "baseline" else "auto",
                                        role))
                write_summary(root, results)
    print("\n" + summary_table(results), flush=True)
    print(f"\n[muppet-ray] results: {root.uri('results.csv')}", flush=True)
    return results


def write_summary(root: RunDir, results: list[FinetuneResult]) -> None:
    rows = [asdict(r) for r in results]
    write_rows(root, rows, [k for k in rows[0] if k != "metrics"])
    root.write_text("summary.md", summary_table(results) + "\n")


def summary_table(results: list[FinetuneResult]) -> str:
    """Mean and spread over seeds, per source and fraction (markdown)."""
    groups: dict[tuple, list[FinetuneResult]] = {}
    for r in results:
        groups.setdefault((r.role, r.source, r.fraction), []).append(r)
    metric = results[0].metric
    lines = [f"| model | source | fraction | examples | seeds | {metric} mean | std | head |",
             "|---|---|---|---|---|---|---|---|"]
    for (role, source, fraction), runs in groups.items():
        values = [r.value for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {role} | {source} | {fraction:g} | {runs[0].train_examples} | "
                     f"{len(runs)} | {statistics.mean(values):.3f} | {spread:.3f} | "
                     f"{runs[0].head} |")
    return "\n".join(lines)


def evaluate(base: Config, given: str, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Validation metrics of a model on tasks, without training: every task needs a trained
    head in the source (its own, or the shared one of its type)."""
    name = base.run.name or "evaluate-" + "-".join(tasks)[:60]
    root = run_root(base, name)
    source = resolve_source(given, root.root)
    config = finetune_config(base, source, tasks[0], 1.0, base.training.seed, root.root,
                             "scores")
    config = config.replace({"tasks.include": tasks})
    resolved = resolve_and_check(config)
    heads, _ = initial_heads(source, resolved, "reuse", asked_by="evaluate")
    result = launch(config, "evaluate", initial_heads=heads, evaluate_only=True)
    root.write_text("metrics.json", json.dumps(result.after, indent=2))
    return result.after
