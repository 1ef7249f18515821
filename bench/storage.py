"""What object storage costs a run: the same short run stored at a local path and in an S3
bucket (moto's server on 127.0.0.1), back to back, as ratios.

    python bench/storage.py [--repeats 2] [--steps 100]

The run: `muppet-ray prefinetune` (the default job: built-in suite, small BART, 2 workers,
ZeRO-2) for `--steps` steps, a checkpoint every half, from an empty storage each time (so the
chunk cache is written and read there too), then the same command again, which resumes from its
final checkpoint and only exports. Runs alternate local, S3, local, S3, ...

Figures (median over repeats): the whole first command, its training tokens/s, the resuming
command, and the bytes stored. The S3 server is a Python process on this same 2-core machine:
it takes CPU from the run that a real bucket would not, and has no network latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cli
import pyarrow.fs as pafs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from tests.services import BUCKET, s3_server  # noqa: E402


def command(storage: str, name: str, steps: int) -> list[str]:
    settings = [f"run.storage_path={storage}", f"run.name={name}", f"training.max_steps={steps}",
                f"training.checkpoint_every={steps // 2}", "training.max_eval_examples=64"]
    return [sys.executable, "-m", "muppet_ray", "prefinetune",
            *[a for s in settings for a in ("--set", s)]]


def timed(args: list[str], env: dict) -> float:
    began = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench: {' '.join(args[-8:])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def stored(storage: str) -> tuple[list[dict], int]:
    """(the run's train records, bytes below the storage root)."""
    fs, path = pafs.FileSystem.from_uri(storage)
    files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if i.type == pafs.FileType.File]
    log = next(i.path for i in files if i.path.endswith("/metrics.jsonl"))
    with fs.open_input_stream(log) as f:
        records = [json.loads(line) for line in f.read().decode().splitlines() if line]
    return [r for r in records if r["kind"] == "train"], sum(i.size for i in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    bench_cli.positive(repeats=args.repeats, steps=args.steps)
    figures: dict[str, dict[str, list[float]]] = {"local": {}, "s3": {}}
    with s3_server() as s3, tempfile.TemporaryDirectory(prefix="bench-storage-") as scratch:
        env = {**os.environ, **s3, "PYTHONUNBUFFERED": "1"}
        os.environ.update(s3)  # (this process reads the bucket too)
        for repeat in range(args.repeats):
            for kind in ("local", "s3"):
                storage = (f"{scratch}/local-{repeat}" if kind == "local"
                           else f"s3://{BUCKET}/bench-{repeat}")
                first = timed(command(storage, "run", args.steps), env)
                again = timed(command(storage, "run", args.steps), env)
                train, size = stored(storage)
                steady = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
                for key, value in (("first", first), ("resume", again),
                                   ("tokens_per_s", statistics.median(steady)),
                                   ("stored_mb", size / 2**20)):
                    figures[kind].setdefault(key, []).append(value)
                print(f"[bench] {kind} {repeat + 1}/{args.repeats}: whole command {first:.1f} s, "
                      f"resume {again:.1f} s", flush=True)
    median = {kind: {k: statistics.median(v) for k, v in f.items()} for kind, f in figures.items()}
    rows = [("whole command, fresh storage (s)", "first"), ("training tokens/s (median)",
            "tokens_per_s"), ("the same command again: resume, export (s)", "resume"),
            ("stored (MB)", "stored_mb")]
    print(f"\n| figure ({args.steps} steps, median of {args.repeats}) | local path | S3 (moto, "
          "loopback) | S3 / local |")
    print("|---|---|---|---|")
    for label, key in rows:
        local, s3 = median["local"][key], median["s3"][key]
        print(f"| {label} | {local:,.1f} | {s3:,.1f} | {s3 / local:.2f} |")


if __name__ == "__main__":
    main()
