"""One fine-tuning run of the evaluation protocol, for two checkouts side by side: what a sweep
point's scoring (320 such runs) costs, and whether the checkouts score alike.

    python bench/protocol_run.py --code OLD --code NEW [--storage ROOT] [--task T]
                                 [--fraction 1] [--lr 1e-4] [--seed 0] [--repeats 3] [--profile]

`protocol.fine_tune` of one eval task of jobs/configs/task-curve.yaml (plain MiniLM, a fresh
head, the curve's protocol; `MUPPET_SHARED` defaults to ../shared), run in a fresh process per
checkout (`PYTHONPATH`), the checkouts taking turns, with as many threads as a protocol run
(`scaling.cpus_per_worker`). The task's
splits come from ROOT's chunk cache (`ROOT/.chunk-cache`; Ray Data tokenizes what is missing
there first). Prints the median seconds of each checkout, its ratio to the first, and the
validation and test scores each gave (more than one where its repeats disagree); `--profile`
also prints where the first checkout's run spends its time (torch's profiler, top operators).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_cli

ROOT = Path(__file__).resolve().parent.parent


def commit(code: Path) -> str:
    """The checkout's commit, with a + where its files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(code), *args], capture_output=True,
                              text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or str(code)) + (
        "+" if git("status", "--porcelain", "--untracked-files=no") else "")


def one_run(args: argparse.Namespace) -> None:
    """In a process of its own, with one checkout on the path: one run, a JSON line."""
    import torch
    import transformers

    from muppet_ray import data, protocol, runtime
    from muppet_ray.config import load_config
    from muppet_ray.finetune import finetune_config
    from muppet_ray.heads import initial_heads
    from muppet_ray.model_source import Source
    from muppet_ray.tasks import resolve_tasks
    from muppet_ray.tokenizer import load_tokenizer

    transformers.logging.set_verbosity_error()
    base = protocol.eval_config(load_config(args.config).replace(
        {"run.storage_path": args.storage}))
    source = Source("plain backbone", base.model.pretrained)
    tokenizer = load_tokenizer(source.model)
    config = finetune_config(base, source, args.task, args.fraction, args.seed, "/tmp", "-")
    task = resolve_tasks(config)[0]
    caches = data.prepare_each([([task], data.ChunkSettings.from_config(config))],
                               data.cache_root(args.storage), tokenizer,
                               ("train", *protocol.SPLITS))[0][task.name]
    heads, _ = initial_heads(source, [task], base.protocol.head)
    torch.set_num_threads(max(1, int(base.scaling.cpus_per_worker)))  # (as _fine_tune_runs)
    runtime.no_cpu_kernel_cache()
    start = time.monotonic()
    profile = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
               if args.profile else contextlib.nullcontext())
    with profile:
        validation, test, steps = protocol.fine_tune(config, tokenizer, task, heads, caches,
                                                     args.lr, torch.device("cpu"))
    seconds = time.monotonic() - start
    if args.profile:
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12),
              file=sys.stderr)
    print(json.dumps({"seconds": seconds, "validation": validation, "test": test,
                      "steps": steps}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=[])
    parser.add_argument("--config", default=str(ROOT / "jobs/configs/task-curve.yaml"))
    parser.add_argument("--storage", default="/tmp/protocol-run-bench")
    parser.add_argument("--task", default="intent_recognition")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return one_run(args)
    codes = bench_cli.checkouts(args.code) or [ROOT]
    bench_cli.positive(fraction=args.fraction, lr=args.lr, repeats=args.repeats)
    # (the config's data and model: ../shared beside this checkout, unless given)
    os.environ.setdefault("MUPPET_SHARED", str((ROOT.parent / "shared").resolve()))
    runs: dict[int, list[dict]] = {i: [] for i in range(len(codes))}
    for repeat in range(args.repeats):
        for i, code in enumerate(codes):
            command = [sys.executable, __file__, "--inner", "--config", args.config,
                       "--storage", args.storage, "--task", args.task,
                       "--fraction", str(args.fraction), "--lr", str(args.lr),
                       "--seed", str(args.seed)]
            if args.profile and repeat == 0 and i == 0:
                command.append("--profile")
            done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(code)},
                                  cwd=code, capture_output=True, text=True)
            last = (done.stderr.strip().splitlines() or [""])[-1]
            if done.returncode == 2 and last.startswith("bench: "):  # (bad input: its line)
                bench_cli.fail(f"{commit(code)}: {last.removeprefix('bench: ')}")
            if done.returncode:
                sys.exit(f"{commit(code)}: the run failed:\n{done.stderr[-3000:]}")
            if "--profile" in command:
                print(done.stderr[-6000:])
            runs[i].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[bench] repeat {repeat + 1}/{args.repeats} {commit(code)}: "
                  f"{runs[i][-1]['seconds']:.1f} s", flush=True)
    first = statistics.median(r["seconds"] for r in runs[0])
    print(f"\n{args.task}, fraction {args.fraction:g}, lr {args.lr:g}, seed {args.seed}: "
          f"{runs[0][0]['steps']} steps\n")
    print("| code | median s | ratio to the first | validation | test |")
    print("|---|---|---|---|---|")
    for i, code in enumerate(codes):
        seconds = statistics.median(r["seconds"] for r in runs[i])
        scores = sorted({(r["validation"], r["test"]) for r in runs[i]})
        validation, test = (", ".join(f"{s[k]:.4f}" for s in scores) for k in (0, 1))
        print(f"| {commit(code)} | {seconds:.1f} | {seconds / first:.2f} | {validation} | "
              f"{test} |")

if __name__ == "__main__":
    bench_cli.run(main)
