"""The pre-finetuning job, as the CLI and `jobs/prefinetune.py` run it.

Order matters for bad input: everything that can be checked without Ray (config, tasks, model
type, files) is checked first; the run directory is created only then, and removed again if the
data turns out to be bad, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from muppet_ray import data, suite
from muppet_ray.config import (
    VERBOSE,
    Config,
    expand_variables,
    micro_batches_per_step,
    to_yaml,
    validate,
)
from muppet_ray.errors import ConfigError, MuppetError, TrainingError, storage_faults
from muppet_ray.metrics import read_log
from muppet_ray.model import check_positions, is_encoder_decoder
from muppet_ray.sources import BuiltinSource, FileSource
from muppet_ray.storage import RunDir, check_shared, check_writable, normalize, run_root
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import Task, resolve_tasks
from muppet_ray.tokenizer import load_tokenizer, texts_of, train_tokenizer
from muppet_ray.train import WorkerPlan, train_loop_per_worker

TOKENIZER_SAMPLE = 500  # examples per task that the run-time tokenizer is trained on
# Ray Train's controller checks its workers this often (seconds), read from the environment. On a
# local cluster muppet-ray lowers Ray's 2 s default (see prepare_local_cluster).
CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_CHECK_INTERVAL_S = "0.2"


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


def start_ray(config: Config) -> None:
    _check_interval_setting()
    if ray.is_initialized():
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose() else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level)
        _keep_ray_off_the_console()
        return
    # A local cluster: the workers and the Ray Data tasks that feed them share the machine's
    # cores, so declare enough logical CPUs for both (the OS shares the real ones). "local":
    # a new one, even where `ray start` left a cluster that plain ray.init() would join.
    needed = config.scaling.max_workers * config.scaling.cpus_per_worker + 2
    prepare_local_cluster()
    ray.init(address="local", num_cpus=int(max(os.cpu_count() or 1, needed)),
             logging_level=level, include_dashboard=False)
    _keep_ray_off_the_console()


def _check_interval_setting() -> None:
    """A bad CHECK_INTERVAL would fail the run inside Ray Train's controller, with its traceback."""
    value = os.environ.get(CHECK_INTERVAL)
    try:
        good = value is None or (math.isfinite(float(value)) and float(value) > 0)
    except ValueError:
        good = False
    if not good:
        raise ConfigError(f"{CHECK_INTERVAL}: expected a number of seconds above 0, got {value!r}")


def prepare_local_cluster() -> None:
    """Settings for a local cluster, read by this process and, from the environment, by the
    cluster's processes that `ray.init` then starts."""
    # One machine: listen on the loopback address only, not on the machine's routable one
    # (Ray does that for single-machine clusters on macOS and Windows; this does it on Linux).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray Train's PlacementGroupCleaner asks Ray's state API every 2 s whether the run's
    # controller is alive. With no address it asks the newest cluster on the machine: once a
    # `ray start --head` runs beside this one, that cluster, which does not know the controller,
    # and the cleaner removes the run's placement group, killing its workers mid-run. This
    # cluster has no dashboard to answer anyway: an address nothing listens on makes every
    # question fail, which the cleaner takes as "unknown, keep waiting".
    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:0"
    # Ray Train's controller looks at its workers every 2 s, and a worker's report (a checkpoint,
    # an evaluation) waits until the controller has taken the one before: ~8 s of a 40 s laptop
    # run. 0.2 s costs a small local cluster nothing. (Ray Train passes the driver's value on.)
    os.environ.setdefault(CHECK_INTERVAL, LOCAL_CHECK_INTERVAL_S)


def verbose() -> bool:
    """`--verbose`: the console shows what Ray and the libraries print, not only our lines."""
    return os.environ.get(VERBOSE) == "1"


def _keep_ray_off_the_console() -> None:
    """Ray forwards every line its processes print (its own logs, Ray Train's, DeepSpeed's and
    transformers') to this console: ~100 lines a run. Only muppet-ray's own lines stay; the rest
    are in Ray's session logs, where Ray writes them anyway. (A worker's error still reaches
    this process, as the exception `fit()` raises.) Not with `--verbose`."""
    if verbose():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as forwarded

    def ours(batch: dict) -> None:
        for line in batch["lines"]:
            if "[muppet-ray]" in line:
                print(line, file=sys.stderr if batch["is_err"] else sys.stdout, flush=True)

    forwarded.remove_handler("ray_print_logs")  # (Ray's printer, added by ray.init)
    forwarded.add_handler("muppet_ray_lines", ours)
    # Ray Data, in this process, prints each execution's plan and tips at INFO (its log file
    # keeps them): errors only.
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.ERROR)
    node = ray._private.worker._global_node  # (None for a Ray Client connection)
    if node is not None:
        print(f"[muppet-ray] Ray's own log lines: {node.get_logs_dir_path()}", flush=True)


def _warn_if_no_cpu_left(config: Config) -> None:
    """The Ray Data tasks that feed the workers each need a CPU of their own: on a cluster whose
    CPUs the workers take up (`ray start --head` on a 2-core laptop declares 2), they wait for
    one, and on a fixed cluster the run waits with them, forever (an autoscaler adds a node)."""
    cpus = ray.cluster_resources().get("CPU", 0)
    taken = config.scaling.min_workers * config.scaling.cpus_per_worker
    if cpus - taken < 1:
        print(f"[muppet-ray] warning: the cluster has {cpus:g} CPUs and the workers take "
              f"{taken:g} (scaling.num_workers x scaling.cpus_per_worker, at least), leaving "
              "none for the Ray Data tasks that feed them: unless an autoscaler adds a node, "
              "the run will wait for one. Declare more logical CPUs (`ray start --head "
              f"--num-cpus {int(taken) + 2}`) or use fewer workers.", flush=True)


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
    tasks = resolve_and_check(config)
    name = config.run.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = normalize(config.run.storage_path)
    run_dir = run_root(config, name)
    resuming = run_dir.exists("config.yaml")
    config_yaml = to_yaml(config.model_copy(update={"run": config.run.model_copy(
        update={"name": name})}))
    if resuming and training_settings(run_dir.read_text("config.yaml")) != training_settings(
            config_yaml):
        # Another config would mean another schedule: resuming could repeat or skip data.
        raise ConfigError(f"run.name: run {run_dir.root!r} exists with a different config; "
                          "choose a new run.name (or repeat the original settings to resume)")
    start_ray(config)
    check_shared(storage)
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
    if not evaluate_only:
        _describe(config, tasks, caches)

    use_gpu = config.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    _warn_if_no_cpu_left(config)
    plan = WorkerPlan(
        config=config, config_yaml=config_yaml, run_dir=run_dir.root, tokenizer=tokenizer,
        layouts=[t.layout() for t in tasks],
        train_caches=[caches[t.name].get("train") for t in tasks],
        eval_caches=[caches[t.name]["validation"] for t in tasks],
        initial_heads=initial_heads or {}, evaluate_only=evaluate_only)
    scaling = config.scaling
    trainer = TorchTrainer(
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
    with storage_faults(run_dir.root):
        trainer.fit()
    stopped = [r["reason"] for r in read_log(run_dir) if r["kind"] == "stopped"]
    if stopped:
        raise TrainingError(f"run {run_dir.root!r} stopped: {stopped[-1]}")
    evaluations = [r for r in read_log(run_dir) if r["kind"] == "eval"]
    before = next((r["metrics"] for r in evaluations if r["step"] == 0), {})
    after = evaluations[-1]["metrics"] if evaluations else {}
    export = "" if evaluate_only else run_dir.uri("export")
    train_examples = {t.name: caches[t.name]["train"].examples for t in tasks
                      if "train" in caches[t.name]}
    result = RunResult(run_dir.root, export, before, after, tasks, train_examples)
    print("\n" + result.table(), flush=True)
    if export:
        print(f"\n[muppet-ray] export: {export}", flush=True)
    return result


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


def _save_tokenizer(tokenizer, run_dir: RunDir) -> None:
    with tempfile.TemporaryDirectory(prefix="muppet-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        run_dir.upload(local, "tokenizer")


def _describe(config: Config, tasks: list[Task], caches) -> None:
    examples = {t.name: caches[t.name]["train"].examples for t in tasks}
    per_step = micro_batches_per_step(config) * config.batching.micro_batch_size
    epochs = config.training.max_steps * per_step / max(1, sum(examples.values()))
    print(f"[muppet-ray] {len(tasks)} tasks, {sum(examples.values()):,} training examples; "
          f"{config.training.max_steps} steps x {per_step} examples = {epochs:.2f} epochs of "
          f"the mixture ({config.mixture.rule}, {config.batching.strategy} batches)", flush=True)
    for task in tasks:
        skipped = sum(caches[task.name][split].skipped for split in ("train", "validation"))
        note = f"  ({skipped:,} bad rows skipped)" if skipped else ""
        print(f"[muppet-ray]   {task.name:<14} {task.type:<16} {examples[task.name]:>7,} "
              f"examples  metric {TASK_TYPES[task.type].metric}{note}", flush=True)
