"""Fine-tuning and evaluation, starting from a pre-finetuned model (or a plain one).

A fine-tuning run is a pre-finetuning run (prefinetune.py: same Ray Data, Ray Train and
DeepSpeed code) on one task, whose backbone is the source model and whose head starts from the
source's trained head where there is one:

    head of the task type       reused when ("auto")
    classification/regression   the task itself was in the source's mixture, same labels
    multiple choice, span       the source trained the shared head (any task of that type)
    generation                  always: the LM head is part of the backbone

`--head reuse` demands a trained head (an error if there is none); `--head new` starts fresh.

`compare` runs the grid the paper's sample-efficiency study needs: for each source (the
pre-finetuned model, and the backbone it started from as the baseline), each training fraction
(nested subsets) and each seed, one run; it writes every run's `results.json` and one summary.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs
import torch
import yaml
from safetensors.torch import load_file

from muppet_ray.checkpoint import damage, newest_intact
from muppet_ray.config import Config, ModelConfig, expand_variables, parse_config, validate
from muppet_ray.errors import ConfigError
from muppet_ray.export import MANIFEST, to_transformers, write_export
from muppet_ray.storage import CHECKPOINT_SNAPSHOT, RunDir, normalize
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import Task, resolve_tasks

HEAD_CHOICES = ("auto", "reuse", "new")


@dataclass(frozen=True)
class Source:
    """A model to start from: a directory `transformers` loads (with the tokenizer) or a Hub id,
    and the muppet-ray manifest when it is one of our exports (None: no trained heads)."""

    given: str  # what the user named
    model: str  # for model.pretrained
    manifest: dict | None = None

    @property
    def heads_file(self) -> str:
        return os.path.join(self.model, "heads.safetensors")

    def trained_heads(self) -> dict[str, str]:
        """Head -> a task that trained it (classification heads: task -> itself)."""
        found: dict[str, str] = {}
        for spec in (self.manifest or {}).get("tasks", []):
            head = TASK_TYPES[spec["type"]].head
            found.setdefault(spec["name"] if head == "classification" else head, spec["name"])
        return found


def resolve_source(given: str, work_dir: str) -> Source:
    """`--from`: an export, a run (its export, or else its latest checkpoint), a checkpoint, a
    model directory, or a Hub id. Checkpoints are turned into an export under `work_dir`."""
    path = os.path.expanduser(given)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST)):
            return _export_source(given, path)
        if os.path.exists(os.path.join(path, "export", MANIFEST)):
            return _export_source(given, os.path.join(path, "export"))
        checkpoints = RunDir(path).registered_checkpoints()
        if os.path.exists(os.path.join(path, "config.yaml")) and checkpoints:
            intact = newest_intact(pafs.LocalFileSystem(), path, checkpoints)
            return _export_source(given, checkpoint_to_export(
                os.path.join(path, intact or checkpoints[-1]), work_dir, verified=bool(intact)))
        if os.path.isdir(os.path.join(path, "deepspeed")):
            return _export_source(given, checkpoint_to_export(path, work_dir))
        if os.path.exists(os.path.join(path, "config.json")):
            return Source(given, os.path.abspath(path))
        raise ConfigError(f"--from {given!r}: not an export, run, checkpoint or model directory "
                          "(no muppet.json, export/, checkpoint_*/ or config.json in it)")
    if given.startswith(("/", ".", "~")) or given.count("/") > 1:  # a path, not a Hub id
        raise ConfigError(f"--from {given!r}: no such directory")
    from transformers import AutoConfig

    try:  # a Hub id (HF_HUB_OFFLINE and HF_ENDPOINT apply)
        AutoConfig.from_pretrained(given)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"--from {given!r}: no such directory, and not a loadable Hub model "
                          f"({first})") from None
    return Source(given, given)


def _export_source(given: str, export_dir: str) -> Source:
    with open(os.path.join(export_dir, MANIFEST)) as f:
        return Source(given, os.path.abspath(export_dir), json.load(f))


def checkpoint_to_export(checkpoint_dir: str, work_dir: str, verified: bool = False) -> str:
    """A Ray Train checkpoint of a run (DeepSpeed's sharded files) as an export directory.
    `verified`: its manifests were checked already (they are not read twice)."""
    from muppet_ray.model import MuppetModel, build_backbone
    from muppet_ray.tokenizer import load_tokenizer

    checkpoint_dir = os.path.abspath(checkpoint_dir)
    run = RunDir(os.path.dirname(checkpoint_dir))
    name = os.path.basename(checkpoint_dir)
    if not (run.exists("config.yaml") and run.exists("tasks.json") and run.exists("tokenizer")):
        raise ConfigError(f"--from {checkpoint_dir!r}: a checkpoint must sit in its run "
                          "directory (next to config.yaml, tasks.json and tokenizer/)")
    if run.exists(CHECKPOINT_SNAPSHOT) and name not in run.registered_checkpoints():
        raise ConfigError(f"--from {checkpoint_dir!r}: Ray Train did not register it (written in "
                          "part, by a run that stopped while saving it?); use an earlier one")
    problem = None if verified else damage(pafs.LocalFileSystem(), checkpoint_dir)
    if problem:
        raise ConfigError(f"--from {checkpoint_dir!r}: the checkpoint is damaged ({problem}); "
                          "use an earlier one")
    out = RunDir(work_dir)
    if out.exists(f"from-{name}/{MANIFEST}"):
        return out.uri(f"from-{name}")
    config_yaml = run.read_text("config.yaml")
    config = parse_config(config_yaml)
    tokenizer = load_tokenizer(run.uri("tokenizer"))
    specs = json.loads(run.read_text("tasks.json"))
    model = MuppetModel(build_backbone(config.model, tokenizer), specs, config.model.dropout,
                        config.training.loss_scaling, config.model.max_target_length, tokenizer)
    missing, unexpected = model.load_state_dict(_checkpoint_weights(checkpoint_dir), strict=False)
    if missing or unexpected:  # (strict, but as a one-line error)
        raise ConfigError(f"--from {checkpoint_dir!r}: the checkpoint does not match the run's "
                          f"model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    step = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0
    return write_export(model, tokenizer, out, step, config_yaml, relative=f"from-{name}")


def _checkpoint_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from muppet_ray.train import CHECKPOINT_TAG

    states = glob.glob(os.path.join(checkpoint_dir, CHECKPOINT_TAG, "*optim_states.pt"))
    if states:  # ZeRO 1-3: parameters are sharded with the optimizer state
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    path = os.path.join(checkpoint_dir, CHECKPOINT_TAG, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--from {checkpoint_dir!r}: no DeepSpeed checkpoint in it")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def initial_heads(source: Source, tasks: list[Task], choice: str, asked_by: str = "--head reuse"
                  ) -> tuple[dict, dict[str, str]]:
    """The trained head tensors to start `tasks` from (keyed as `MuppetModel.heads`), and for
    each task where its head comes from ('new', or the source task that trained it)."""
    if choice not in HEAD_CHOICES:
        raise ConfigError(f"--head: expected one of {list(HEAD_CHOICES)}, got {choice!r}")
    trained = source.trained_heads()
    specs = {s["name"]: s for s in (source.manifest or {}).get("tasks", [])}
    origin: dict[str, str] = {}
    for task in tasks:
        head = task.task_type.head
        if head == "generation":
            origin[task.name] = f"{source.given} (LM head)"
            continue
        key = task.name if head == "classification" else head
        reason = None
        if key not in trained:
            reason = (f"{source.given!r} has no trained {head.replace('_', ' ')} head"
                      + (f" for task {task.name!r}" if head == "classification" else ""))
        elif head == "classification" and (specs[task.name]["type"], specs[task.name]["labels"]
                                           ) != (task.type, list(task.labels)):
            reason = (f"task {task.name!r} was trained in {source.given!r} with another type "
                      f"or labels ({specs[task.name]['type']}, {specs[task.name]['labels']})")
        if reason and choice == "reuse":
            raise ConfigError(f"{asked_by}: {reason}")
        origin[task.name] = "new" if reason or choice == "new" else trained[key]
    reused = [t for t in tasks if origin[t.name] not in ("new",)
              and t.task_type.head != "generation"]
    if not reused:
        return {}, origin
    return _head_tensors(source, tasks, reused), origin


def _head_tensors(source: Source, tasks: list[Task], reused: list[Task]) -> dict:
    heads = load_file(source.heads_file)
    out: dict[str, torch.Tensor] = {}
    for shared in ("multiple_choice", "span"):
        if any(t.task_type.head == shared for t in reused):
            out.update({k: v for k, v in heads.items() if k.startswith(f"{shared}.")})
    class_tasks = [t for t in tasks if t.task_type.head == "classification"]
    if any(t in class_tasks for t in reused):
        # The new model stacks the heads of its own classification tasks: copy each reused one
        # into its slot (all of them are reused when any is: see `finetune` and `evaluate`).
        source_index = [s["name"] for s in source.manifest["tasks"]
                        if TASK_TYPES[s["type"]].head == "classification"]
        width = max(t.num_outputs for t in class_tasks)
        rows = [source_index.index(t.name) for t in class_tasks]
        out["classification.dense_weight"] = heads["classification.dense_weight"][rows]
        out["classification.dense_bias"] = heads["classification.dense_bias"][rows]
        out["classification.out_weight"] = _fit(heads["classification.out_weight"][rows], width)
        out["classification.out_bias"] = _fit(heads["classification.out_bias"][rows], width)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def _fit(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad the last dimension (the stacked heads are as wide as the widest)."""
    if tensor.shape[-1] >= width:
        return tensor[..., :width]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))


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
    raw = base.model_dump(mode="json")
    manifest = (like or source).manifest
    if manifest:
        trained = expand_variables(yaml.safe_load(manifest["config"])).get("model", {})
        for key in ModelConfig.model_fields.keys() - base.model.model_fields_set:
            if key in trained:
                raw["model"][key] = trained[key]
    raw["model"]["pretrained"] = source.model
    raw["tasks"].update(include=[task], train_fraction=fraction)
    raw["training"]["seed"] = seed
    raw["run"].update(storage_path=storage, name=name)
    return validate(raw)


def finetune(config: Config, source: Source, head: str = "auto", role: str = "pre-finetuned",
             callbacks: list | None = None) -> FinetuneResult:
    """One fine-tuning run: `config` names one task in tasks.include. A run that already
    finished with this config is not run again: its results.json is the result."""
    from muppet_ray.config import to_yaml
    from muppet_ray.prefinetune import check, prefinetune, training_settings

    done = RunDir(f"{normalize(config.run.storage_path)}/{config.run.name}")
    if done.exists("results.json") and done.exists("config.yaml") and training_settings(
            done.read_text("config.yaml")) == training_settings(to_yaml(config)):
        return FinetuneResult(**json.loads(done.read_text("results.json")))
    tasks = check(config)
    if len(tasks) != 1:
        raise ConfigError(f"tasks.include: fine-tuning takes one task, got {len(tasks)}")
    task = tasks[0]
    heads, origin = initial_heads(source, tasks, head)
    run = prefinetune(config, job="finetune", initial_heads=heads, callbacks=callbacks)
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
    from muppet_ray.export import AUTO_CLASSES, MAPPABLE_BACKBONES

    if task.type not in AUTO_CLASSES:
        return ""
    with tempfile.TemporaryDirectory(prefix="muppet-hf-") as local:
        RunDir(export_uri).download("", f"{local}/export")
        with open(f"{local}/export/config.json") as f:
            if json.load(f).get("model_type") not in MAPPABLE_BACKBONES:
                return ""
        to_transformers(f"{local}/export", task.name, f"{local}/hf")
        out = RunDir(out_uri)
        out.upload(f"{local}/hf", "")
    return out.root


def baseline_source(source: Source, work_dir: str) -> Source:
    """The backbone a pre-finetuned source started from: its `model.pretrained`, or (for a
    backbone built from scratch) the same seeded initial weights, saved under `work_dir`."""
    if source.manifest is None:
        raise ConfigError(f"--baseline auto: {source.given!r} is not a muppet-ray export, so "
                          "its starting backbone is unknown; name it (--baseline MODEL)")
    config = parse_config(source.manifest["config"])
    if config.model.pretrained is not None:
        return resolve_source(config.model.pretrained, work_dir)
    from muppet_ray.tokenizer import load_tokenizer

    init = initial_weights(config, load_tokenizer(source.model), work_dir)
    return Source(f"{source.given} (initial weights)", init)


def initial_weights(config: Config, tokenizer, work_dir: str) -> str:
    """A backbone built from scratch as a run with `config` starts it (same seed, same
    weights), saved with its tokenizer as `<work_dir>/baseline-init`."""
    out = RunDir(work_dir)
    if not out.exists("baseline-init/config.json"):
        from muppet_ray.model import build_backbone

        torch.manual_seed(config.training.seed)  # as the run's workers do (train.py)
        backbone = build_backbone(config.model, tokenizer)
        with tempfile.TemporaryDirectory(prefix="muppet-init-") as local:
            backbone.save_pretrained(local)
            tokenizer.save_pretrained(local)
            out.upload(local, "baseline-init")
    return out.uri("baseline-init")


def check_fractions(fractions: list[float]) -> None:
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fractions: each fraction must be in (0, 1], got {fraction}")


def compare(base: Config, given: str, task: str, fractions: list[float], seeds: list[int],
            baseline: str | None = None, head: str = "auto") -> list[FinetuneResult]:
    """Fine-tune `task` from `given` (and from a baseline) on each fraction and seed."""
    check_fractions(fractions)
    name = base.run.name or f"finetune-{task}"
    root = RunDir(f"{normalize(base.run.storage_path)}/{name}")
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
    root.write_text("results.json", json.dumps(rows, indent=2))
    columns = [k for k in rows[0] if k != "metrics"]
    with tempfile.TemporaryDirectory() as local:
        path = os.path.join(local, "results.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with open(path) as f:
            root.write_text("results.csv", f.read())
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
    from muppet_ray.prefinetune import check, prefinetune

    name = base.run.name or "evaluate-" + "-".join(tasks)[:60]
    root = RunDir(f"{normalize(base.run.storage_path)}/{name}")
    source = resolve_source(given, root.root)
    config = finetune_config(base, source, tasks[0], 1.0, base.training.seed, root.root,
                             "scores")
    config = validate({**config.model_dump(mode="json"),
                       "tasks": {**config.tasks.model_dump(mode="json"), "include": tasks}})
    resolved = check(config)
    heads, _ = initial_heads(source, resolved, "reuse", asked_by="evaluate")
    result = prefinetune(config, job="evaluate", initial_heads=heads, evaluate_only=True)
    root.write_text("metrics.json", json.dumps(result.after, indent=2))
    return result.after
