"""The pre-finetuning job, as the CLI and `jobs/prefinetune.py` run it.

Order matters for bad input: everything that can be checked without Ray (config, tasks, model
type, files) is checked first; the run directory is created only then, and removed again if the
data turns out to be bad, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from muppet_ray import cluster, data, runtime, suite
from muppet_ray.config import (
    Config,
    expand_variables,
    micro_batches_per_step,
    to_yaml,
    validate,
)
from muppet_ray.errors import ConfigError, MuppetError, TrainingError, storage_faults
from muppet_ray.metrics import Phases, read_log
from muppet_ray.mixture import examples_per_micro_batch
from muppet_ray.model import check_positions, is_encoder_decoder
from muppet_ray.sources import BuiltinSource, FileSource
from muppet_ray.storage import RunDir, check_writable, normalize, run_root
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import Task, resolve_tasks
from muppet_ray.tokenizer import load_tokenizer, texts_of, train_tokenizer
from muppet_ray.train import WorkerPlan, train_loop_per_worker

TOKENIZER_SAMPLE = 500  # examples per task that the run-time tokenizer is trained on


@dataclass
class RunResult:
    run_dir: str
    export_dir: str
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    tasks: list[Task]
    train_examples: dict[str, int]

    def table(self) -> str:
        lines = [f"{'task':<14} {'type':<16} {'metric':<9} {'chance':>7} {'before':>7} "
                 f"{'after':>7}"]
        for task in self.tasks:
            metric = task.task_type.metric
            before = self.before.get(task.name, {})
            after = self.after.get(task.name, {})
            chance = f"{after['chance']:.3f}" if "chance" in after else (
                "0.000" if task.type == "regression" else "-")
            lines.append(f"{task.name:<14} {task.type:<16} {metric:<9} {chance:>7} "
                         f"{before.get(metric, float('nan')):>7.3f} "
                         f"{after.get(metric, float('nan')):>7.3f}")
        return "\n".join(lines)


def resolve_and_check(config: Config) -> list[Task]:
    """The run's tasks, and everything about the run that can be checked before Ray starts."""
    tasks = resolve_tasks(config)
    if not is_encoder_decoder(config.model):
        generation = [t.name for t in tasks if t.type == "generation"]
        if generation:
            backbone = config.model.pretrained or config.model.arch
            raise ConfigError(f"tasks {generation} are generation tasks, which need an "
                              f"encoder-decoder backbone; model {backbone!r} is encoder-only")
    for task in tasks:
        if isinstance(task.source, FileSource):
            task.source.check_exists(task.name)
    check_positions(config.model)
    check_writable(normalize(config.run.storage_path))
    if config.training.warmup_steps >= config.training.max_steps:
        print(f"[muppet-ray] warning: training.warmup_steps ({config.training.warmup_steps}) is "
              f"not below training.max_steps ({config.training.max_steps}): the learning rate "
              "never reaches training.learning_rate", file=sys.stderr, flush=True)
    return tasks


def build_tokenizer(config: Config, tasks: list[Task]):
    if config.model.pretrained is not None:
        return load_tokenizer(config.model.pretrained)
    # Built-in backbones get a tokenizer trained on the whole built-in suite's text (plus a
    # sample of any custom task), so later fine-tuning on held-out suite tasks needs no new one.
    sources = [BuiltinSource(name, config.tasks.data_seed, config.tasks.suite_scale)
               for name in suite.SUITE]
    sources += [t.source for t in tasks if not isinstance(t.source, BuiltinSource)]
    samples = (example for source in sources for example in source.sample(
        "train", TOKENIZER_SAMPLE))
    return train_tokenizer(texts_of(samples), config.model.vocab_size, config.model.max_length)


def prefinetune(config: Config, callbacks: list | None = None) -> RunResult:
    """Pre-finetune on the config's tasks. `callbacks`: Ray Train callbacks (a sweep passes
    Tune's TuneReportCallback)."""
    return launch(config, "prefinetune", callbacks=callbacks)


def launch(config: Config, job: str, initial_heads: dict | None = None,
           evaluate_only: bool = False, callbacks: list | None = None) -> RunResult:
    """One Ray Train run of the config's tasks — what pre-finetuning, fine-tuning (finetune.py:
    one task, started from trained heads) and evaluation (`evaluate_only`: the starting model
    scored, no training) all are. `job` names the run directory when run.name is unset."""
    began = time.time()
    tasks = resolve_and_check(config)
    name = config.run.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = normalize(config.run.storage_path)
    run_dir = run_root(config, name)
    config_yaml = to_yaml(config.replace({"run.name": name}))
    resuming = check_resumable(run_dir, config_yaml)
    runtime.start_ray(config)
    cluster.check_shared(storage)
    use_gpu = _wait_for_workers(config.scaling, name)
    driver = Phases(began)
    driver.since_began("starting Ray")
    with driver.timed("tokenizing"):
        tokenizer, caches = _prepare_run_dir(config, tasks, run_dir, config_yaml, resuming,
                                             evaluate_only)
    if not evaluate_only:
        _describe(config, tasks, caches)
    cluster.warn_if_no_cpu_left(config)
    plan = WorkerPlan(
        config=config, config_yaml=config_yaml, run_dir=run_dir.root, tokenizer=tokenizer,
        layouts=[t.layout() for t in tasks],
        train_caches=[caches[t.name].get("train") for t in tasks],
        eval_caches=[caches[t.name]["validation"] for t in tasks],
        initial_heads=initial_heads or {}, evaluate_only=evaluate_only)
    fit_began = time.time()
    with storage_faults(run_dir.root):
        # (the metrics of its latest checkpoint: the final one's hold the evaluations)
        metrics = _torch_trainer(config, plan, name, storage, use_gpu, callbacks).fit().metrics
    log = read_log(run_dir)
    if "after" not in (metrics or {}):  # (the run stopped itself, and logged why)
        reasons = [r["reason"] for r in log if r["kind"] == "stopped"]
        raise TrainingError(f"run {run_dir.root!r} stopped: "
                            f"{reasons[-1] if reasons else 'without a final checkpoint'}")
    export = "" if evaluate_only else run_dir.uri("export")
    train_examples = {t.name: caches[t.name]["train"].examples for t in tasks
                      if "train" in caches[t.name]}
    result = RunResult(run_dir.root, export, metrics["before"], metrics["after"], tasks,
                       train_examples)
    print("\n" + result.table(), flush=True)
    if export:
        print(f"\n[muppet-ray] export: {export}", flush=True)
    worker = next((r for r in reversed(log) if r["kind"] == "time"), None)
    if worker:
        print(f"[muppet-ray] {time_line(driver.seconds, fit_began, worker, time.time() - began)}",
              flush=True)
    return result


def time_line(driver: dict[str, float], fit_began: float, worker: dict, total: float) -> str:
    """Where a run's time went: the driver's phases, then worker 0's (its "time" record, whose
    start-up begins when the driver starts Ray Train), the rest as "other"."""
    seconds = dict(driver)
    for phase, value in worker["seconds"].items():
        # (start-up: from the driver's clock to worker 0's; they may be two nodes' clocks)
        seconds[phase] = value + (max(0.0, worker["began"] - fit_began) if phase == "start-up"
                                  else 0)
    seconds["other"] = max(0.0, total - sum(seconds.values()))
    return f"{total:.0f} s: " + ", ".join(f"{phase} {value:.1f}"
                                          for phase, value in seconds.items())


def check_resumable(run_dir: RunDir, config_yaml: str) -> bool:
    """Whether the run exists already (then it resumes), after checking that its config
    decides the same data and updates."""
    if not run_dir.exists("config.yaml"):
        return False
    changed = changed_settings(run_dir.read_text("config.yaml"), config_yaml)
    if changed:
        # Another config would mean another schedule: resuming could repeat or skip data.
        raise ConfigError(f"run.name: run {run_dir.root!r} exists with a different config "
                          f"({', '.join(changed)}); choose a new run.name (or repeat the "
                          "original settings to resume)")
    return True


def _wait_for_workers(scaling, name: str) -> bool:
    """Wait until the cluster has room for the run's workers (before anything is written: a run
    that can never get its workers leaves nothing behind); returns whether they use GPUs."""
    use_gpu, why = cluster.use_gpu(scaling)
    worker = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
              **scaling.resources_per_worker}
    print(f"[muppet-ray] {scaling.min_workers}"
          + (f" to {scaling.max_workers}" if scaling.elastic else "")
          + f" workers on {'GPU' if use_gpu else 'CPU'} ({why})", flush=True)
    cluster.wait_for_room(worker, scaling.min_workers, scaling.start_timeout_s,
                          f"the workers of run {name!r}")
    return use_gpu


def _prepare_run_dir(config: Config, tasks: list[Task], run_dir: RunDir, config_yaml: str,
                     resuming: bool, evaluate_only: bool) -> tuple:
    """The run directory's config, task layouts and tokenizer, and the tasks tokenized into the
    chunk cache; returns (tokenizer, caches). A new run's directory is removed again if its
    data turns out to be bad."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with storage_faults(run_dir.root):  # (a full or read-only storage: one line)
            if not resuming:
                run_dir.write_text("config.yaml", config_yaml)
                # (with the config: what a checkpoint needs to become a model again)
                run_dir.write_text("tasks.json", json.dumps([t.layout().to_json() for t in tasks]))
            if resuming and run_dir.exists("tokenizer"):
                # (a tokenizer trained again could differ, and with it every token id)
                tokenizer = load_tokenizer(run_dir.uri("tokenizer"))
            else:
                tokenizer = build_tokenizer(config, tasks)
                _save_tokenizer(tokenizer, run_dir)
            print(f"[muppet-ray] run directory {run_dir.root}; tokenizing {len(tasks)} tasks "
                  "with Ray Data", flush=True)
            splits = ("validation",) if evaluate_only else ("train", "validation")
            storage = normalize(config.run.storage_path)
            caches = data.prepare(tasks, data.cache_root(storage), tokenizer,
                                  data.ChunkSettings.from_config(config), splits)
            if resuming and run_dir.exists(data.DATA_RECORD):
                data.check_unchanged(tasks, data.read_run_caches(run_dir), caches)
            data.write_run_caches(run_dir, caches)
    except MuppetError:
        if not resuming:  # (no half-made run directory left behind to "resume")
            with contextlib.suppress(OSError):
                run_dir.remove()
        raise
    return tokenizer, caches


def _torch_trainer(config: Config, plan: WorkerPlan, name: str, storage: str, use_gpu: bool,
                   callbacks: list | None) -> TorchTrainer:
    scaling = config.scaling
    return TorchTrainer(
        # The plan is bound to the function rather than given as train_loop_config: Ray Train's
        # controller unpickles that one (importing torch, transformers and DeepSpeed to do so:
        # ~5 s of every run's start on a laptop), though only the workers read it.
        functools.partial(train_loop_per_worker, plan),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker,
                                  **scaling.resources_per_worker},
            **({"elastic_resize_monitor_interval_s": scaling.resize_interval_s}
               if scaling.elastic else {})),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints)),
    )


def training_settings(config_yaml: str) -> dict:
    """What decides the data and updates of a run: every section but `run` (where the run lives,
    how it is supervised), `scaling` (a run may resume on more or fewer workers) and `protocol`
    (how sweeps score it afterwards), plus the
    micro-batches per step. Read through today's Config, so a run written before a setting
    existed compares equal with that setting's default."""
    raw = yaml.safe_load(config_yaml) or {}
    try:
        config = validate(expand_variables(raw))
    except ConfigError:
        settings = raw  # (a setting that no longer exists: never equal to a current config)
    else:
        settings = config.model_dump(mode="json")
        settings["micro_batches_per_step"] = micro_batches_per_step(config)
    for section in ("run", "scaling", "protocol"):
        settings.pop(section, None)
    return settings


def changed_settings(stored_yaml: str, config_yaml: str) -> list[str]:
    """The settings (`section.key`) that decide a run's data and updates (training_settings) in
    which a config differs from a run's stored one. `deepspeed.zero_stage: auto` matches any
    stage (a resumed run keeps its checkpoint's), so runs from before it was the default resume."""
    old, new = training_settings(stored_yaml), training_settings(config_yaml)
    changed = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            changed += [section] if a != b else []
            continue
        for key in sorted(set(a) | set(b)):
            auto = section == "deepspeed" and key == "zero_stage" and "auto" in (a.get(key),
                                                                                 b.get(key))
            if a.get(key) != b.get(key) and not auto:
                changed.append(f"{section}.{key}")
    return changed


def _save_tokenizer(tokenizer, run_dir: RunDir) -> None:
    with run_dir.staged("tokenizer") as local:
        tokenizer.save_pretrained(local)


def _describe(config: Config, tasks: list[Task], caches) -> None:
    examples = {t.name: caches[t.name]["train"].examples for t in tasks}
    budget = config.batching.tokens_per_micro_batch
    # (with a token budget, micro-batches hold more examples of short tasks: their mean)
    per_step = micro_batches_per_step(config) * examples_per_micro_batch(
        [caches[t.name]["train"].chunks for t in tasks], list(examples.values()),
        config.mixture, config.batching, list(examples))
    epochs = config.training.max_steps * per_step / max(1, sum(examples.values()))
    size = (f"~{per_step:,.0f} examples ({budget} tokens a micro-batch)" if budget
            else f"{per_step:.0f} examples")
    print(f"[muppet-ray] {len(tasks)} tasks, {sum(examples.values()):,} training examples; "
          f"{config.training.max_steps} steps x {size} = {epochs:.2f} epochs of "
          f"the mixture ({config.mixture.rule}, {config.batching.strategy} batches)", flush=True)
    for task in tasks:
        skipped = sum(caches[task.name][split].skipped for split in ("train", "validation"))
        note = f"  ({skipped:,} bad rows skipped)" if skipped else ""
        print(f"[muppet-ray]   {task.name:<14} {task.type:<16} {examples[task.name]:>7,} "
              f"examples  metric {TASK_TYPES[task.type].metric}{note}", flush=True)
