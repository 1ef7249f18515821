"""Mixing many tasks on Ray Data: fidelity and cost of three ways, on the same chunks.

    python bench/mixture.py [--tasks 30] [--micro-batches 3000]

Every way mixes the same pre-collated single-task chunks (the run's chunk cache) with
examples-proportional targets:
  mix, default blocks   Dataset.mix over per-task pipelines as Ray Data blocks them
  mix, 1-chunk blocks   the same with every block re-cut to one micro-batch
  schedule (muppet-ray) the stride schedule streamed by data.stream
Fidelity: the largest gap between a task's share and its target over any window of 100 or 300
consecutive micro-batches. Cost: examples per second reaching one consumer.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import bench_cli
import numpy as np
import ray

from muppet_ray import data, suite
from muppet_ray.config import BatchingConfig, MixtureConfig
from muppet_ray.mixture import build_schedule
from muppet_ray.sources import BuiltinSource
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import Task
from muppet_ray.tokenizer import texts_of, train_tokenizer

MICRO_BATCH = 16


def make_tasks(count: int) -> list[Task]:
    """`count` tasks of varied sizes, drawn from the built-in suite's generators."""
    bases = [n for n in suite.DEFAULT_MIXTURE]
    tasks = []
    for i in range(count):
        base = bases[i % len(bases)]
        spec = suite.SUITE[base]
        scale = (1 + i % 5) / 5
        tasks.append(Task(f"{base}_{i}", spec.type, BuiltinSource(base, i, scale), spec.labels))
    return tasks


def worst_gap(order: np.ndarray, target: np.ndarray, window: int) -> float:
    worst = 0.0
    for start in range(0, len(order) - window, window // 4):
        share = np.bincount(order[start:start + window], minlength=len(target)) / window
        worst = max(worst, float(np.abs(share - target).max()))
    return worst


def consume(rows, limit: int) -> tuple[np.ndarray, float]:
    tasks, examples, start = [], 0, time.perf_counter()
    for row in rows:
        tasks.append(int(np.ravel(row["task"])[0]))
        examples += int(row["num_examples"])
        if len(tasks) == limit:
            break
    return np.array(tasks), examples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=3000)
    args = parser.parse_args()
    bench_cli.positive(tasks=args.tasks, micro_batches=args.micro_batches)
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    tasks = make_tasks(args.tasks)
    tokenizer = train_tokenizer(
        texts_of(e for t in suite.SUITE for e in BuiltinSource(t, 0, 1).sample("train", 200)),
        2000, 128)
    run_dir = RunDir(tempfile.mkdtemp(prefix="muppet-bench-"))
    caches = data.prepare(tasks, run_dir, tokenizer,
                          data.ChunkSettings(Limits(128, 32), MICRO_BATCH, 64, seed=0))
    train = [caches[t.name]["train"] for t in tasks]
    sizes = np.array([c.examples for c in train])
    target = sizes / sizes.sum()
    limit = min(args.micro_batches, sum(c.chunks for c in train))

    results = []
    for name, one_chunk_blocks in (("mix, default blocks", False), ("mix, 1-chunk blocks", True)):
        streams = []
        for index, cache in enumerate(train):
            ds = ray.data.read_parquet(cache.directory, columns=["num_examples", "payload"])
            ds = ds.map_batches(lambda b, i=index: {**b, "task": np.full(len(b["payload"]), i)})
            if one_chunk_blocks:
                ds = ds.repartition(target_num_rows_per_block=1)
            streams.append(ds)
        mixed = streams[0].mix(*streams[1:], weights=[float(c.chunks) for c in train])
        mixed.context.execution_options.preserve_order = True
        order, speed = consume(mixed.iter_rows(), limit)
        results.append((name, order, speed))

    steps = -(-limit // (2 * 1))
    schedule = build_schedule([c.chunks for c in train], list(sizes), MixtureConfig(),
                              BatchingConfig(grad_accum_steps=1), 1, steps, 0)
    order, speed = consume(data.stream(schedule, schedule.worker_positions(0, 1), train,
                                        tokenizer.pad_token_id),
                           limit)
    results.append(("schedule (muppet-ray)", order, speed))

    print(f"\n{args.tasks} tasks, {limit} micro-batches of {MICRO_BATCH} examples, "
          f"examples-proportional; {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    print(f"{'way':<24} {'gap@100':>8} {'gap@300':>8} {'examples/s':>11}")
    for name, order, speed in results:
        print(f"{name:<24} {worst_gap(order, target, 100):>8.3f} "
              f"{worst_gap(order, target, 300):>8.3f} {speed:>11,.0f}")


if __name__ == "__main__":
    main()
