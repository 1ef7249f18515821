"""Does this code reproduce a score cache's stored protocol runs? (Before a sweep reuses scores
that other code made: the cache is keyed by settings, model, data and device, not by code.)

    python bench/rescore.py --config C.yaml --storage ROOT --eval-tasks a,b [--model M]
                            [--fractions 0.1,1] [--seeds 0,...,9] [--groups 1]

For the model (default: the config's plain `model.pretrained`, a sweep's point 0), every eval
task x seed group the protocol would score is looked up in `ROOT/.protocol-cache` under the key
this code computes (as `score_model` looks: one found under its old key is kept under the new
one too); then the first `--groups` seeds of each eval task are fine-tuned again here,
every fraction and learning rate, with as many threads as a protocol task
(`scaling.cpus_per_worker`), and their scores, steps and training examples compared with the
stored ones. Needs the groups' chunks in `ROOT/.chunk-cache` (it tokenizes what is missing, with
Ray Data). Prints a table; exits 1 if a group is missing or a recomputed run differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import bench_cli
import torch
import transformers

from muppet_ray import data, protocol, runtime
from muppet_ray.config import load_config
from muppet_ray.finetune import finetune_config
from muppet_ray.heads import initial_heads
from muppet_ray.model_source import Source
from muppet_ray.storage import RunDir
from muppet_ray.tasks import resolve_tasks
from muppet_ray.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--storage", required=True, help="the storage root of the score cache")
    parser.add_argument("--eval-tasks", required=True)
    parser.add_argument("--model", default=None, help="default: the config's model.pretrained")
    parser.add_argument("--fractions", default="0.1,1")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--groups", type=int, default=1, help="seeds per eval task to rerun")
    args = parser.parse_args()
    fractions = bench_cli.numbers("--fractions", args.fractions)
    seeds = bench_cli.numbers("--seeds", args.seeds, int)
    bench_cli.positive(groups=args.groups)
    transformers.logging.set_verbosity_error()  # (a load report for each of the runs)
    transformers.logging.disable_progress_bar()
    base = protocol.eval_config(load_config(args.config).replace(
        {"run.storage_path": args.storage}))
    source = Source("plain backbone", args.model or base.model.pretrained)
    tokenizer = load_tokenizer(source.model)
    store = RunDir(f"{args.storage.rstrip('/')}/{protocol.SCORES_DIR}")
    groups = [(name, seed, {f: finetune_config(base, source, name, f, seed, "/tmp", "-")
                            for f in fractions})
              for name in args.eval_tasks.split(",") for seed in seeds]
    prepared = data.prepare_each(
        [(resolve_tasks(c), data.ChunkSettings.from_config(c))
         for *_, configs in groups for c in configs.values()],
        data.cache_root(args.storage), tokenizer, ("train", *protocol.SPLITS))
    stored, found = {}, 0
    for i, (name, seed, configs) in enumerate(groups):
        task = resolve_tasks(configs[fractions[0]])[0]
        caches = {f: prepared[i * len(fractions) + j][name] for j, f in enumerate(fractions)}
        # (as score_model looks a group up: under its key, or its key of before 2026-12-05)
        text = protocol.stored_scores(
            store, protocol._group_key(configs, source, task, caches),
            protocol._group_key(configs, source, task, caches, by_location=True))
        found += text is not None
        if text is not None and seeds.index(seed) < args.groups:
            stored[name, seed] = (task, configs, caches, json.loads(text))
    print(f"{found} of {len(groups)} groups found in {store.root} under this code's keys\n")

    torch.set_num_threads(max(1, int(base.scaling.cpus_per_worker)))  # (as _fine_tune_runs)
    runtime.no_cpu_kernel_cache()
    print("| task | seed | fraction | lr | stored validation / test | recomputed | equal | s |")
    print("|---|---|---|---|---|---|---|---|")
    differ = 0
    for (name, seed), (task, configs, caches, scores) in stored.items():
        heads, _ = initial_heads(source, [task], base.protocol.head)
        for s in scores:
            start = time.monotonic()
            validation, test, steps = protocol.fine_tune(
                configs[s["fraction"]], tokenizer, task, heads, caches[s["fraction"]],
                s["learning_rate"], torch.device("cpu"))
            equal = (validation, test, steps, caches[s["fraction"]]["train"].examples) == (
                s["validation"], s["test"], s["steps"], s["train_examples"])
            differ += not equal
            print(f"| {name} | {seed} | {s['fraction']} | {s['learning_rate']:g} | "
                  f"{s['validation']:.6f} / {s['test']:.6f} | {validation:.6f} / {test:.6f} | "
                  f"{'yes' if equal else 'NO'} | {time.monotonic() - start:.0f} |", flush=True)
    print(f"\n{len(groups) - found} groups missing, {differ} recomputed runs differ")
    sys.exit(1 if differ or found < len(groups) else 0)


if __name__ == "__main__":
    bench_cli.run(main)
