"""The downstream evaluation protocol: how sweeps judge a pre-finetuned model against the plain one.

Each eval task is split once, seeded and fixed, into train / validation / test
(`protocol.test_fraction`; its validation split as configured). For each model, eval task,
training fraction (nested subsets of the train split, drawn with the seed) and seed, a fresh
copy of the model is fine-tuned for `protocol.epochs` epochs at each of
`protocol.learning_rates`, its head starting from the one the model's pre-finetuning trained
where there is one (`protocol.head: auto`) or fresh (`new`: only the encoders differ). The
learning rate is chosen per model, task and fraction on the mean validation score over seeds,
never on test; the test scores of that choice are reported.

Models are compared paired: the same subsets and seeds, so a lucky subset helps both. The
difference of a model to the baseline, per seed the mean over eval tasks, gets a mean and a
Student-t 95% interval over seeds.

Each fine-tuning run is small (hundreds of examples), so it runs in one process — a Ray task per
eval task and seed, which a cluster runs side by side, on a GPU of its own where the workers of
pre-finetuning would get one (cluster.use_gpu) — rather than as a Ray Train run, whose start-up
(~35 s on a laptop) would outweigh its training. Its steps are pre-finetuning's (step.py: the
same passes, precision and optimizer), as are its model, heads, losses, tokenized chunks and
metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, replace

import numpy as np
import ray
import scipy.stats
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from muppet_ray import batch as mb
from muppet_ray import cluster, data, runtime
from muppet_ray.config import Config
from muppet_ray.finetune import finetune_config
from muppet_ray.heads import head_origins, initial_heads, is_reused
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.model_source import Source
from muppet_ray.step import SingleDeviceEngine, forward_backward, passes, uses_bf16
from muppet_ray.storage import RunDir, normalize
from muppet_ray.tasks import Task, resolve_tasks
from muppet_ray.tokenizer import load_tokenizer

SPLITS = ("validation", "test")
SCORES_DIR = ".protocol-cache"  # below the storage root: the scores of finished groups
# The training settings a protocol run reads (its steps, learning rate and warm-up are its own).
PROTOCOL_TRAINING = ("seed", "weight_decay", "grad_clip", "loss_scaling", "max_eval_examples")


@dataclass(frozen=True)
class Score:
    """One fine-tuning run of the protocol."""

    model: str  # the label of the model scored (a sweep point)
    task: str
    metric: str
    fraction: float
    seed: int
    learning_rate: float
    validation: float
    test: float
    train_examples: int
    steps: int
    head: str  # "new", or the source task whose trained head it started from
    device: str = "cpu"  # where it trained


def eval_config(base: Config) -> Config:
    """`base` with the test split held out of every file task (the split every model sees)."""
    return base.replace({"tasks.test_fraction": base.protocol.test_fraction})


def score_model(base: Config, source: Source, label: str, eval_tasks: list[str],
                fractions: list[float], seeds: list[int], work_dir: str) -> list[Score]:
    """Every run of the protocol for one model: each eval task x fraction x seed x learning
    rate. Tokenized splits are shared through the storage's chunk cache, and the scores of
    each eval task and seed are kept below the storage root: a model scored the same way before
    (the plain backbone of another sweep, a restarted one) is not fine-tuned again."""
    base = eval_config(base)
    tokenizer = load_tokenizer(source.model)
    cache = data.cache_root(normalize(base.run.storage_path))
    # (outside the placement group of a Tune trial that calls this, which holds no CPUs for it)
    on_gpu, _ = cluster.use_gpu(base.scaling)
    run = ray.remote(_fine_tune_runs).options(
        num_cpus=base.scaling.cpus_per_worker, num_gpus=1 if on_gpu else 0, max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    store = RunDir(f"{normalize(base.run.storage_path)}/{SCORES_DIR}")
    groups = []  # per eval task and seed: (the task, {fraction: its config})
    for name in eval_tasks:
        for seed in seeds:
            configs = {f: finetune_config(base, source, name, f, seed, work_dir, "-")
                       for f in fractions}
            groups.append((resolve_tasks(configs[fractions[0]])[0], configs))
    # (every group's splits tokenized at once: their Ray Data jobs run side by side)
    prepared = iter(data.prepare_each(
        [([task], data.ChunkSettings.from_config(c)) for task, configs in groups
         for c in configs.values()], cache, tokenizer, ("train", *SPLITS)))
    pending, keys, scores = [], {}, []
    for task, configs in groups:
        caches = {f: next(prepared)[task.name] for f in configs}
        key = _group_key(configs, source, task, caches, on_gpu)
        text = stored_scores(store, key, _group_key(configs, source, task, caches, on_gpu,
                                                    by_location=True))
        if text is not None:  # (scored before: another sweep, or a restart)
            scores += [replace(Score(**s), model=label) for s in json.loads(text)]
            continue
        pending.append(run.remote(configs, source, label, task, caches))
        keys[pending[-1]] = key
    total = len(pending)
    while pending:
        done, pending = ray.wait(pending)
        group = ray.get(done[0])
        store.write_text(f"{keys[done[0]]}.json", json.dumps([asdict(s) for s in group]))
        scores += group
        print(f"[muppet-ray] {label}: {total - len(pending)} of {total} task x seed "
              "fine-tuning groups scored", flush=True)
    return scores


def stored_scores(store: RunDir, key: str, legacy: str) -> str | None:
    """A group's stored scores: under its key, or under its key of before 2026-12-05 (which held
    the chunk cache's location: _group_key's `by_location`), then kept under its key too."""
    if store.exists(f"{key}.json"):
        return store.read_text(f"{key}.json")
    if store.exists(f"{legacy}.json"):
        text = store.read_text(f"{legacy}.json")
        store.write_text(f"{key}.json", text)
        return text
    return None


def _group_key(configs: dict[float, Config], source: Source, task: Task,
               caches: dict[float, dict[str, data.CacheIndex]], on_gpu: bool = False,
               by_location: bool = False) -> str:
    """What a group's scores depend on: the settings its runs read (not where they are stored,
    nor the pre-finetuning's own schedule), the model and head it starts from, its tokenized
    data (by its fingerprint; `by_location`: by where its cache is, as keys were made before
    2026-12-05), and the device and precision it trains in."""
    settings = []
    for config in configs.values():
        raw = config.model_dump(mode="json")
        raw["tasks"]["custom"] = [t for t in raw["tasks"]["custom"]  # (this task's spec only)
                                  if t["name"] in config.tasks.include]
        del raw["protocol"]["head"]  # (the head a run starts from is keyed below)
        if not raw["batching"]["tokens_per_micro_batch"]:  # (off: the keys from before it)
            del raw["batching"]["tokens_per_micro_batch"]
        if not raw["tasks"]["also"]:  # (likewise for settings added since)
            del raw["tasks"]["also"]
        for spec in raw["tasks"]["custom"]:
            if spec["type"] != "denoising":
                del spec["noise_density"], spec["mean_span"]
        settings.append({**{k: raw[k] for k in ("model", "tasks", "batching", "protocol")},
                         "training": {k: raw["training"][k] for k in PROTOCOL_TRAINING}})
    tokenized = [[index.directory if by_location else index.fingerprint
                  for _, index in sorted(c.items())] for c in caches.values()]
    keyed = [settings, source.model, source.manifest, tokenized]
    origin = head_origins(source, [task], next(iter(configs.values())).protocol.head)
    if is_reused(task, origin):  # (a fresh head: the same runs under `auto` and `new`)
        keyed.append(origin)
    device = torch.device("cuda" if on_gpu else "cpu")
    bf16 = uses_bf16(next(iter(configs.values())), device)
    if on_gpu or bf16:  # (fp32 on a CPU keeps the keys from before runs could go elsewhere)
        keyed.append({"device": device.type, "bf16": bf16})
    text = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _fine_tune_runs(configs: dict[float, Config], source: Source, label: str, task: Task,
                    caches: dict[float, dict[str, data.CacheIndex]]) -> list[Score]:
    """One eval task and seed: a run per fraction and learning rate (a Ray task)."""
    any_config = next(iter(configs.values()))
    torch.set_num_threads(max(1, int(any_config.scaling.cpus_per_worker)))
    heads, origin = initial_heads(source, [task], any_config.protocol.head)
    tokenizer = load_tokenizer(source.model)
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")  # (a GPU if Ray gave one)
    if device.type == "cpu":  # (before the first forward pass: runtime.no_cpu_kernel_cache)
        runtime.no_cpu_kernel_cache()
    scores = []
    for fraction, config in configs.items():
        for lr in config.protocol.learning_rates:
            validation, test, steps = fine_tune(config, tokenizer, task, heads, caches[fraction],
                                                lr, device)
            scores.append(Score(label, task.name, task.task_type.metric, fraction,
                                config.training.seed, lr, validation, test,
                                caches[fraction]["train"].examples, steps, origin[task.name],
                                device.type))
    return scores


def fine_tune(config: Config, tokenizer, task: Task, heads: dict,
              caches: dict[str, data.CacheIndex], learning_rate: float, device: torch.device
              ) -> tuple[float, float, int]:
    """Fine-tune a fresh copy of `config.model.pretrained` on the task's train chunks, one
    chunk a step, on `device`; returns the headline metric on validation and on test, and the
    number of steps."""
    train, seed = caches["train"], config.training.seed
    steps = config.protocol.epochs * train.chunks
    schedule = config.replace({
        "training.learning_rate": learning_rate, "training.max_steps": steps,
        "training.warmup_steps": round(config.protocol.warmup_ratio * steps)})
    torch.manual_seed(seed)
    model = MuppetModel(build_backbone(config.model, tokenizer), [task.layout()],
                        config.model.dropout, config.training.loss_scaling,
                        config.model.max_target_length, tokenizer)
    model.heads.load_state_dict(heads, strict=False)
    engine = SingleDeviceEngine(model, schedule, device)
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(config.protocol.epochs):
        for chunk in order.permutation(train.chunks):
            batch = data.ChunkReader.read(train, int(chunk), 0)
            forward_backward(engine, passes(batch, batch["attention_mask"].size,
                                            config.batching.max_tokens_per_pass), 1.0, device)
            engine.step()
    validation, test = (metric(engine, task, caches[split]) for split in SPLITS)
    return validation, test, steps


@torch.no_grad()
def metric(engine: SingleDeviceEngine, task: Task, cache: data.CacheIndex) -> float:
    model = engine.module
    model.eval()
    with engine.autocast():
        stats = sum(model.evaluate(mb.to_torch(data.ChunkReader.read(cache, chunk, 0),
                                               engine.device))[0].double().cpu()
                    for chunk in range(cache.chunks))
    model.train()
    pairs = model.take_pairs().get(0)
    return next(iter(task.task_type.finalize(stats.numpy(), pairs).values()))


# ------------------------------------------------------------------------ the report


def chosen(scores: list[Score]) -> list[Score]:
    """Per model, task and fraction, the runs of the learning rate whose mean validation score
    over seeds is best."""
    groups: dict[tuple, dict[float, list[Score]]] = {}
    for s in scores:
        groups.setdefault((s.model, s.task, s.fraction), {}).setdefault(
            s.learning_rate, []).append(s)
    out = []
    for by_lr in groups.values():
        best = max(by_lr, key=lambda lr: _mean([s.validation for s in by_lr[lr]]))
        out += by_lr[best]
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan with one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    t = scipy.stats.t.ppf(0.975, len(values) - 1)
    return mean, float(t) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Difference:
    """A model's paired test-score difference to the baseline, in points (x100)."""

    model: str
    task: str  # an eval task, or "mean" (per seed, the mean over eval tasks)
    fraction: float
    mean: float
    half_width: float
    seeds: int

    @property
    def significant(self) -> bool:
        return abs(self.mean) > self.half_width


def differences(scores: list[Score], baseline: str) -> list[Difference]:
    """Every model's paired differences to `baseline`, per task and over tasks."""
    test = {(s.model, s.task, s.fraction, s.seed): s.test for s in chosen(scores)}
    out = []
    models = list(dict.fromkeys(m for m, *_ in test if m != baseline))
    tasks = list(dict.fromkeys(t for _, t, _, _ in test))
    fractions = sorted({f for _, _, f, _ in test})
    for model in models:
        for fraction in fractions:
            per_seed: dict[int, list[float]] = {}
            for task in tasks:
                deltas = {seed: 100 * (test[model, task, fraction, seed]
                                       - test[baseline, task, fraction, seed])
                          for (m, t, f, seed) in test if (m, t, f) == (model, task, fraction)
                          and (baseline, task, fraction, seed) in test}
                if deltas:
                    out.append(Difference(model, task, fraction,
                                          *interval(list(deltas.values())), len(deltas)))
                for seed, delta in deltas.items():
                    per_seed.setdefault(seed, []).append(delta)
            complete = [statistics.mean(d) for d in per_seed.values() if len(d) == len(tasks)]
            if complete:
                out.append(Difference(model, "mean", fraction, *interval(complete),
                                      len(complete)))
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else -math.inf
