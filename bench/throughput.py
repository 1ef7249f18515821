"""How close muppet-ray gets to the hardware: side by side with plain PyTorch, in one run.

    python bench/throughput.py [--quick] [--repeats 3] [--steps 100] [--shared ../shared]
                               [--set section.key=value ...]

The work: the MiniLM encoder of `<shared>/models`, every BIG-bench classification and
multiple-choice task of `<shared>/data` (30), examples-proportional heterogeneous steps of 32
examples (2 micro-batches of 16), max_length 128, AdamW lr 3e-5. Measured, one after another on
an otherwise idle machine:

  2w        `muppet-ray prefinetune`, 2 workers x 1 CPU, ZeRO-2: the whole command, timed
  1w        the same with 1 worker x 2 CPUs (accumulating 2): same schedule, same micro-batches
  bare      bench/bare_loop.py: those same micro-batches read into memory, trained by a bare
            PyTorch loop (2 threads, the task's own head only, AdamW)
  naive     bench/naive.py: the single-process script a user would write (tokenizer on the fly),
            the same number of steps and validation examples, timed end to end

Figures: steady real tokens/s of 1w and 2w over the bare loop's; the naive script's time over
the whole command's (start-up, tokenization and both evaluations included); where the command's
time goes; peak resident memory of the driver and of the largest worker (sampled from outside
every 0.2 s, and as the workers report it); padding efficiency (real / computed tokens); the
share of step time spent waiting for data. Each figure: min / median / max over the repeats.
The last line is `ratio 1w <x> 2w <y> e2e <z> rss-mb <m>` (medians).

`--code DIR` runs the muppet-ray commands from another checkout (e.g. an older commit, for a
before/after comparison); the bare loop and the naive script always come from this one.
`--set` changes a setting of both muppet-ray runs, e.g. `--set batching.tokens_per_micro_batch=2048`
(micro-batches by a token budget); the bare loop trains on the run's own micro-batches, so it
follows (the naive script does not: its 16-example batches stay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_cli
import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def task_config(shared: Path, steps: int, eval_examples: int) -> dict:
    tasks = []
    for path in sorted((shared / "data/bigbench").rglob("task.json")):
        relative = path.parent.relative_to(shared / "data/bigbench")
        if relative.parts[0] == "gem":  # generation: not for an encoder
            continue
        tasks.append({"name": "_".join(relative.parts), "format": "bigbench",
                      "train": str(path)})
    if not tasks or not (shared / "models/all-MiniLM-L6-v2").is_dir():
        bench_cli.fail(f"--shared {shared}: expected data/bigbench/*/task.json and "
                       "models/all-MiniLM-L6-v2 below it")
    return {
        "model": {"pretrained": str(shared / "models/all-MiniLM-L6-v2"), "max_length": 128},
        "tasks": {"include": [t["name"] for t in tasks], "custom": tasks},
        "batching": {"micro_batch_size": 16, "grad_accum_steps": 1, "eval_batch_size": 32},
        "training": {"max_steps": steps, "learning_rate": 3e-5, "warmup_steps": steps // 10,
                     "log_every": 5, "checkpoint_every": steps,
                     "max_eval_examples": eval_examples},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }


class MemorySampler(threading.Thread):
    """Peak resident memory of a process tree: the root (driver) and each training worker."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.driver_mb = 0.0
        self.worker_mb: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    rss = process.memory_info().rss / 2**20
                    if process.pid == self.root.pid:
                        self.driver_mb = max(self.driver_mb, rss)
                    elif "RayTrainWorker" in " ".join(process.cmdline()):
                        self.worker_mb[process.pid] = max(self.worker_mb.get(process.pid, 0), rss)
                except psutil.Error:
                    pass


def run_command(argv: list[str], env: dict, log_path: Path, cwd: Path = ROOT) -> dict:
    """Run a command to the end; its wall time, its console lines with their times, memory."""
    start = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=cwd)
        sampler = MemorySampler(process.pid)
        sampler.start()
        for line in process.stdout:
            log.write(line)
            lines.append((time.perf_counter() - start, line))
        process.wait()
        sampler.done.set()
    seconds = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"bench: {' '.join(argv[:4])} ... failed (exit {process.returncode}), "
                 f"see {log_path}")
    return {"seconds": seconds, "lines": lines, "driver_mb": sampler.driver_mb,
            "worker_mb": max(sampler.worker_mb.values(), default=0.0)}


def muppet(code: Path, config_path: Path, storage: Path, name: str, overrides: list[str],
           log_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "muppet_ray", "prefinetune", "--config", str(config_path),
            "--set", f"run.storage_path={storage}", "--set", f"run.name={name}",
            *[a for o in overrides for a in ("--set", o)]]
    result = run_command(argv, env, log_path, cwd=code)  # (`-m` imports from the cwd first)
    records = [json.loads(line) for line in (storage / name / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    steady = train[1:] or train  # the first window holds the warm-up
    result["tokens_per_s"] = statistics.mean(r["tokens_per_s"] for r in steady)
    result["real_token_ratio"] = statistics.mean(r["real_token_ratio"] for r in train)
    if "data_wait_share" in train[0]:
        result["data_wait_share"] = statistics.mean(r["data_wait_share"] for r in steady)
        result["reported_worker_mb"] = max(r["peak_rss_mb"] for r in train)
    result["phases"] = phases(result, records)
    return result


def phases(result: dict, records: list[dict]) -> dict:
    """Where the command's time went, from the console lines' times and the eval durations."""
    def first(text: str) -> float | None:
        return next((t for t, line in result["lines"] if text in line), None)

    tokenizing, described = first("tokenizing"), first(" training examples; ")
    evals = [r for r in records if r["kind"] == "eval"]
    before_done, after_done = first("eval @ step 0"), None
    for t, line in result["lines"]:
        if "eval @ step" in line and "eval @ step 0" not in line:
            after_done = t
    out = {}
    if tokenizing is not None and described is not None:
        out["tokenize"] = described - tokenizing
    if evals and "seconds" in evals[0] and before_done and after_done:
        out["eval"] = evals[0]["seconds"] + evals[-1]["seconds"]
        out["start-up"] = (before_done - evals[0]["seconds"]) - (out.get("tokenize") or 0)
        out["train"] = (after_done - evals[-1]["seconds"]) - before_done
        out["after"] = result["seconds"] - after_done  # checkpoint, export, shut-down
    return out


def summary(values: list[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values),
                                              max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 20 steps, 16 validation examples per task (<10 min)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--shared", default=os.environ.get("MUPPET_SHARED", "../shared"))
    parser.add_argument("--code", default=str(ROOT), help="checkout whose muppet-ray is run")
    parser.add_argument("--out", default=None, help="where runs and logs go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of both muppet-ray runs (repeatable)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.eval_examples = 1, 20, 16
    bench_cli.positive(repeats=args.repeats, steps=args.steps, eval_examples=args.eval_examples)
    shared, (code,) = Path(args.shared).resolve(), bench_cli.checkouts([args.code])
    config = task_config(shared, args.steps, args.eval_examples)  # (checked before writing)
    out = Path(args.out or tempfile.mkdtemp(prefix="muppet-bench-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    one_worker = ["scaling.num_workers=1", "scaling.cpus_per_worker=2",
                  "batching.grad_accum_steps=2"]
    figures: dict[str, list[float]] = {}

    def note(key: str, value: float | None) -> None:
        if value is not None:
            figures.setdefault(key, []).append(value)

    for repeat in range(args.repeats):
        storage = out / f"repeat{repeat}"
        print(f"[bench] repeat {repeat + 1}/{args.repeats}: muppet-ray, 2 workers", flush=True)
        two = muppet(code, config_path, storage, "w2", args.set, out / f"w2-{repeat}.log")
        print(f"[bench] repeat {repeat + 1}/{args.repeats}: muppet-ray, 1 worker", flush=True)
        one = muppet(code, config_path, storage, "w1", [*args.set, *one_worker],
                     out / f"w1-{repeat}.log")
        print(f"[bench] repeat {repeat + 1}/{args.repeats}: bare loop", flush=True)
        bare_run = run_command([sys.executable, str(HERE / "bare_loop.py"), str(storage / "w2"),
                                "--steps", str(args.steps), "--threads", "2"], env,
                               out / f"bare-{repeat}.log")
        bare = json.loads(bare_run["lines"][-1][1])
        print(f"[bench] repeat {repeat + 1}/{args.repeats}: naive script", flush=True)
        naive_run = run_command([sys.executable, str(HERE / "naive.py"), "--shared", str(shared),
                                 "--steps", str(args.steps), "--eval-examples",
                                 str(args.eval_examples), "--threads", "2"], env,
                                out / f"naive-{repeat}.log")
        naive = json.loads(naive_run["lines"][-1][1])
        note("bare tokens/s", bare["tokens_per_s"])
        note("naive tokens/s", naive["tokens_per_s"])
        note("1w tokens/s", one["tokens_per_s"])
        note("2w tokens/s", two["tokens_per_s"])
        note("ratio 1w", one["tokens_per_s"] / bare["tokens_per_s"])
        note("ratio 2w", two["tokens_per_s"] / bare["tokens_per_s"])
        note("naive seconds", naive_run["seconds"])
        note("2w command seconds", two["seconds"])
        note("ratio e2e", naive_run["seconds"] / two["seconds"])
        for phase, seconds in two["phases"].items():
            note(f"2w {phase} share", seconds / two["seconds"])
        note("padding efficiency", two["real_token_ratio"])
        note("2w data wait share", two.get("data_wait_share"))
        note("1w data wait share", one.get("data_wait_share"))
        note("driver peak MB", max(one["driver_mb"], two["driver_mb"]))
        note("worker peak MB", max(one["worker_mb"], two["worker_mb"]))
        note("bare loop peak MB", bare["peak_rss_mb"])
        note("worker peak MB (reported)", max(one.get("reported_worker_mb", 0),
                                              two.get("reported_worker_mb", 0)) or None)

    print(f"\nmuppet-ray from {code} ({_commit(code)}), {args.repeats} repeat(s), "
          f"{args.steps} steps; {os.cpu_count()} CPUs; runs in {out}"
          f"{''.join(f'; --set {s}' for s in args.set)}\n")
    print(f"{'figure':<28} {'min / median / max':>30}")
    for key, values in figures.items():
        fmt = "{:,.0f}" if ("MB" in key or "tokens/s" in key or "seconds" in key) else "{:.3f}"
        print(f"{key:<28} {summary(values, fmt):>30}")
    median = {k: statistics.median(v) for k, v in figures.items()}
    print(f"ratio 1w {median['ratio 1w']:.3f} 2w {median['ratio 2w']:.3f} "
          f"e2e {median['ratio e2e']:.3f} rss-mb {median['worker peak MB']:.0f}")


def _commit(code: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
