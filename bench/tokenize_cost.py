"""What tokenizing a run's tasks costs as work, apart from Ray Data's running of it.

    python bench/tokenize_cost.py CONFIG [--split train]

One process, one CPU: each task's split is read (through its source, as the run reads it),
featurized by its task type and collated into chunks of `batching.micro_batch_size` serialized
as the chunk cache stores them, each phase timed. Set beside the "tokenize" share that
`bench/throughput.py` prints for the whole command (the same work run as Ray Data jobs, every
task and split side by side), the difference is what running it costs. Prints one line.
"""

from __future__ import annotations

import argparse
import time

import bench_cli
import ray

from muppet_ray import batch as mb
from muppet_ray.config import load_config
from muppet_ray.task_types import Limits
from muppet_ray.tasks import resolve_tasks
from muppet_ray.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--split", default="train", choices=["train", "validation", "test"])
    args = parser.parse_args()
    config = load_config(args.config)
    tasks = resolve_tasks(config)
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # (sources read with Ray)
    tokenizer = load_tokenizer(config.model.pretrained)
    model = config.model
    limits = Limits(model.max_length, model.max_target_length, model.doc_stride)
    size = config.batching.micro_batch_size
    read = featurize = collate = 0.0
    examples = 0
    for task in tasks:
        began = time.perf_counter()
        rows = task.source.sample(args.split, 10**9)
        read_done = time.perf_counter()
        features = task.task_type.featurize(task, rows, tokenizer, limits)
        featurized = time.perf_counter()
        for i in range(0, len(features), size):
            mb.to_bytes(mb.collate(features[i:i + size], None, tokenizer.pad_token_id))
        read += read_done - began
        featurize += featurized - read_done
        collate += time.perf_counter() - featurized
        examples += len(features)
    print(f"{len(tasks)} tasks, {examples:,} {args.split} examples, one process: read "
          f"{read:.1f} s, featurize {featurize:.1f} s, collate and serialize {collate:.1f} s, "
          f"{examples / (read + featurize + collate):,.0f} examples/s")


if __name__ == "__main__":
    bench_cli.run(main)
