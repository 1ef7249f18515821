"""A training worker's heap on a run's own micro-batches, in one process (no Ray, no DeepSpeed).

    python bench/worker_memory.py RUN_DIR --steps 45 [--max-tokens-per-pass 2048]
        [--onednn-cache N] [--trim-every K] [--mmap-threshold BYTES]

Trains MuppetModel (step.SingleDeviceEngine, passes of batching.max_tokens_per_pass) on the
micro-batches of the run's first steps, one thread, and prints a JSON line every --every steps:
resident memory, glibc's heap (bytes in use and bytes held free; `mallinfo2`), the lifetime peak,
and the CPU seconds and page faults since the last line. `--onednn-cache` sets
ONEDNN_PRIMITIVE_CACHE_CAPACITY (as runtime.no_cpu_kernel_cache does: 0) after torch is imported,
as the worker does; `--trim-every` calls glibc's malloc_trim(0) every K steps; `--mmap-threshold`
fixes glibc's M_MMAP_THRESHOLD. Figures: bench/README.md (worker memory). Linux and glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time

import psutil
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402
from bare_loop import load_micro_batches  # noqa: E402

from muppet_ray.config import expand_variables, validate  # noqa: E402
from muppet_ray.model import MuppetModel, build_backbone  # noqa: E402
from muppet_ray.step import SingleDeviceEngine, forward_backward, passes  # noqa: E402
from muppet_ray.storage import RunDir  # noqa: E402
from muppet_ray.tasks import HeadLayout  # noqa: E402
from muppet_ray.tokenizer import load_tokenizer  # noqa: E402

M_MMAP_THRESHOLD = -3  # (malloc.h)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--max-tokens-per-pass", type=int, default=None)
    parser.add_argument("--onednn-cache", type=int, default=None)
    parser.add_argument("--trim-every", type=int, default=0)
    parser.add_argument("--mmap-threshold", type=int, default=0)
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps, every=args.every)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if args.onednn_cache is not None:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
    if args.mmap_threshold:
        libc.mallopt(M_MMAP_THRESHOLD, args.mmap_threshold)
    torch.set_num_threads(1)  # (a worker's one CPU)
    torch.manual_seed(0)
    run = RunDir(args.run_dir)
    _, specs, per_step, micro_batches = load_micro_batches(run, 0, args.steps)
    config = validate(expand_variables(yaml.safe_load(run.read_text("config.yaml"))))
    tokenizer = load_tokenizer(run.uri("tokenizer"))
    model = MuppetModel(build_backbone(config.model, tokenizer),
                        [HeadLayout.from_json(s) for s in specs], config.model.dropout,
                        config.training.loss_scaling, config.model.max_target_length, tokenizer)
    device = torch.device("cpu")
    engine = SingleDeviceEngine(model, config, device)
    model.train()
    budget = (config.batching.max_tokens_per_pass if args.max_tokens_per_pass is None
              else args.max_tokens_per_pass)
    me = psutil.Process()
    last = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF))
    for step in range(args.steps):
        for batch in micro_batches[step * per_step:(step + 1) * per_step]:
            forward_backward(engine, passes(batch, batch["attention_mask"].size, budget),
                             1 / per_step, device)
        engine.step()
        if args.trim_every and (step + 1) % args.trim_every == 0:
            libc.malloc_trim(0)
        if (step + 1) % args.every == 0:
            now, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            heap = libc.mallinfo2()
            print(json.dumps({
                "step": step + 1, "rss_mb": me.memory_info().rss >> 20,
                "heap_in_use_mb": heap.uordblks >> 20, "heap_free_mb": heap.fordblks >> 20,
                "mmapped_mb": heap.hblkhd >> 20, "peak_mb": usage.ru_maxrss >> 10,
                "wall_s": round(now - last[0], 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime
                               - last[1].ru_utime - last[1].ru_stime, 1),
                "page_faults_k": (usage.ru_minflt - last[1].ru_minflt) // 1000}), flush=True)
            last = (now, usage)


if __name__ == "__main__":
    bench_cli.run(main)
