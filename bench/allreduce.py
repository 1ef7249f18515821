"""The scaling model's communication term, checked on this machine: 2 CPU workers (gloo).

    python bench/allreduce.py [--sizes-mb 1,4,16,64,128] [--repeats 5]

1. All-reduce of S bytes between 2 processes, for several S: fits time = a + b * 2S(W-1)/W (a
   latency, b seconds a byte of bus traffic: the ring algorithm's cost, which docs/benchmarks.md's
   scaling model uses).
2. A real step's reduction: DeepSpeed ZeRO-2 with muppet-ray's one reduction per step
   (train.one_reduction) on a MiniLM-sized model (6 x 384, fp32 gradients on the CPU): the time of
   that reduction (leaving the context; DeepSpeed's reduce-scatter) and of engine.step() (its
   all-gather of the updated weights), against what the fitted line predicts for the model's
   gradient bytes.
Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import bench_cli
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="1,4,16,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_cli.positive(repeats=args.repeats)
    megabytes = bench_cli.numbers("--sizes-mb", args.sizes_mb)
    bench_cli.positive(sizes_mb=min(megabytes))
    sizes = [int(x * 2**20) for x in megabytes]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(worker, args=(port, sizes, args.repeats, results), nprocs=WORLD, join=True)
    report(sizes, dict(results))


def worker(rank: int, port: int, sizes: list[int], repeats: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for size in sizes:
        buffer = torch.ones(size // 4)
        dist.all_reduce(buffer)  # (warm-up)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - start)
        if rank == 0:
            results[size] = statistics.median(times)
    reduce_s, step_s, gradient_bytes = zero2_step(repeats)
    if rank == 0:
        results["zero2"] = (reduce_s, step_s, gradient_bytes)
    dist.destroy_process_group()


def zero2_step(repeats: int) -> tuple[float, float, int]:
    import deepspeed
    from transformers import BertConfig, BertModel

    from muppet_ray.train import one_reduction

    model = BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                 num_attention_heads=12, intermediate_size=1536),
                      add_pooling_layer=False)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
        config={"train_batch_size": WORLD, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 2**62})
    ids = torch.randint(5, 30000, (4, 32))
    reduce_times, step_times = [], []
    for i in range(repeats + 1):
        context = one_reduction(engine, 2)
        context.__enter__()
        engine.backward(engine(input_ids=ids).last_hidden_state.pow(2).mean())
        dist.barrier()  # (both workers done with backward: what follows is communication)
        start = time.perf_counter()
        context.__exit__(None, None, None)
        reduced = time.perf_counter()
        engine.step()
        if i:  # (the first: warm-up)
            reduce_times.append(reduced - start)
            step_times.append(time.perf_counter() - reduced)
    gradient_bytes = 4 * sum(p.numel() for p in model.parameters())
    return statistics.median(reduce_times), statistics.median(step_times), gradient_bytes


def report(sizes: list[int], results: dict) -> None:
    traffic = np.array([2 * s * (WORLD - 1) / WORLD for s in sizes])
    times = np.array([results[s] for s in sizes])
    slope, latency = np.polyfit(traffic, times, 1)
    fitted = latency + slope * traffic
    r2 = 1 - ((times - fitted) ** 2).sum() / ((times - times.mean()) ** 2).sum()
    print(f"{'all-reduce, 2 workers (gloo)':<34} {'measured ms':>12} {'fitted ms':>10}")
    for s, t, f in zip(sizes, times, fitted):
        print(f"{s / 2**20:>10.0f} MB{'':<21} {t * 1e3:>12.1f} {f * 1e3:>10.1f}")
    print(f"fit: {latency * 1e3:.2f} ms + {1 / slope / 1e9:.2f} GB/s of bus traffic "
          f"(R^2 {r2:.3f})")
    reduce_s, step_s, gradient_bytes = results["zero2"]
    predicted = latency + slope * 2 * gradient_bytes * (WORLD - 1) / WORLD
    print(f"\nZeRO-2 step, MiniLM-sized ({gradient_bytes / 2**20:.0f} MB of fp32 gradients):")
    print(f"  reduce-scatter (one_reduction) {reduce_s * 1e3:.1f} ms + step with all-gather "
          f"{step_s * 1e3:.1f} ms = {(reduce_s + step_s) * 1e3:.1f} ms; the line predicts "
          f"{predicted * 1e3:.1f} ms for the communication (ratio measured / predicted "
          f"{(reduce_s + step_s) / predicted:.2f}; the step also runs AdamW)")


if __name__ == "__main__":
    main()
