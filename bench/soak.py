"""A long run: does memory stay flat, does speed hold, do old checkpoints go?

    python bench/soak.py [--steps 3000] [--checkpoint-every 100] [--out DIR] [--code DIR]

The main job (`muppet-ray prefinetune`: built-in suite, small BART, 2 CPU workers, ZeRO-2) for
`--steps` steps with a checkpoint every `--checkpoint-every`. Printed: the driver's and the
largest worker's resident memory near step 500, at the middle and at the end (the driver sampled
from outside, the workers as they report it in metrics.jsonl), the growth from step 500 to the
end (target: under 5%), real tokens/s per 500 steps, and how many checkpoints remain against
`run.keep_checkpoints`. Not part of CI: it takes about 10-15 minutes on 2 cores.
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

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", default=None, help="where the run goes (default: a temp dir)")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose muppet-ray is run")
    args = parser.parse_args()
    if args.steps < 1000:
        bench_cli.fail("--steps: at least 1000 (memory is compared from step 500 on)")
    bench_cli.positive(checkpoint_every=args.checkpoint_every)
    (code,) = bench_cli.checkouts([args.code])
    out = Path(args.out or tempfile.mkdtemp(prefix="muppet-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    run = out / "soak"
    argv = [sys.executable, "-m", "muppet_ray", "prefinetune",
            "--set", f"training.max_steps={args.steps}",
            "--set", f"training.checkpoint_every={args.checkpoint_every}",
            "--set", f"run.storage_path={out}", "--set", "run.name=soak"]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    driver: list[tuple[int, float]] = []  # (latest logged step, driver resident MB)
    started = time.perf_counter()
    with open(out / "soak.log", "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=code)
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(process.pid)
            while not done.wait(2.0):
                try:
                    mb = root.memory_info().rss / 2**20
                except psutil.Error:
                    return
                driver.append((_latest_step(run), mb))

        threading.Thread(target=sample, daemon=True).start()
        process.wait()
        done.set()
    if process.returncode:
        sys.exit(f"bench: the soak run failed (exit {process.returncode}), see {out / 'soak.log'}")
    minutes = (time.perf_counter() - started) / 60
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]

    def worker_mb_at(step: int) -> float:
        return min(train, key=lambda r: abs(r["step"] - step))["rss_mb"]

    def driver_mb_at(step: int) -> float:
        near = [mb for s, mb in driver if s is not None and abs(s - step) <= args.steps // 20]
        return max(near) if near else float("nan")

    marks = {"step 500": 500, "middle": args.steps // 2, "end": args.steps}
    print(f"\nsoak: {args.steps} steps, checkpoint every {args.checkpoint_every}, "
          f"{minutes:.1f} min, run in {run}\n")
    print(f"{'':<26}" + "".join(f"{m:>12}" for m in marks) + f"{'growth':>10}")
    for name, at in (("driver resident MB", driver_mb_at), ("worker resident MB (max)",
                                                              worker_mb_at)):
        values = [at(step) for step in marks.values()]
        growth = (values[-1] - values[0]) / values[0]
        print(f"{name:<26}" + "".join(f"{v:>12,.0f}" for v in values) + f"{growth:>10.1%}")
    print("\nreal tokens/s per 500 steps")
    for first in range(0, args.steps, 500):
        rates = [r["tokens_per_s"] for r in train if first < r["step"] <= first + 500]
        if rates:
            print(f"  steps {first + 1:>5}-{min(first + 500, args.steps):<5} "
                  f"{statistics.mean(rates):>10,.0f}")
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    config = (run / "config.yaml").read_text()
    keep = next(int(line.split(":")[1]) for line in config.splitlines()
                if line.strip().startswith("keep_checkpoints:"))
    print(f"\ncheckpoints kept: {len(kept)} ({', '.join(kept)}); run.keep_checkpoints {keep}")


def _latest_step(run: Path) -> int | None:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    steps = [json.loads(line)["step"] for line in lines[-5:] if '"kind": "train"' in line]
    return steps[-1] if steps else None


if __name__ == "__main__":
    main()
