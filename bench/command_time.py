"""Where the main command's time goes, for two checkouts side by side (issue 24, item 4).

    python bench/command_time.py --code OLD --code NEW [--repeats 2] [--shared ../shared]
                                 [--s3 [--nodes N]] [--set section.key=value ...]

`muppet-ray prefinetune` of bench/throughput.py's `--quick` work (MiniLM, the 30 BIG-bench
classification and multiple-choice tasks, 2 workers x 1 CPU, 20 steps, 16 validation examples a
task), each run in a fresh storage root (so it tokenizes), the checkouts taking turns. Phases
from the console lines' times (throughput.phases: the same cut for any commit); where the
command prints its own time line (`[muppet-ray] N s: starting Ray ...`), that too. Prints a
table of medians, and each checkout's ratio of whole command to training time. `--s3` stores the
runs in a bucket of moto's S3 server on 127.0.0.1 instead (the phases then from the run's
metrics.jsonl read back from the bucket); `--nodes N` (with `--s3`) runs each command as the
driver of a cluster of its own, a head and N worker nodes (`ray start` on loopback, sharing
nothing but the bucket: tests/services.py) started with that checkout's code, one training
worker on each worker node; `--set` changes a setting of every run (e.g.
`training.checkpoint_every=5`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_cli
import yaml
from throughput import ROOT, muppet, phases, run_command, task_config

sys.path.insert(0, str(ROOT))
from muppet_ray.metrics import read_log  # noqa: E402
from muppet_ray.storage import RunDir  # noqa: E402
from tests.services import BUCKET, multinode_cluster, s3_server  # noqa: E402


def commit(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or str(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shared", default=os.environ.get("MUPPET_SHARED", "../shared"))
    parser.add_argument("--s3", action="store_true", help="runs stored in a local S3 server")
    parser.add_argument("--nodes", type=int, default=0,
                        help="with --s3: each run on a cluster of a head and N worker nodes")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    codes = bench_cli.checkouts(args.code)
    bench_cli.positive(repeats=args.repeats)
    if args.nodes < 0:
        bench_cli.fail(f"--nodes {args.nodes}: expected a number of worker nodes, 1 or more")
    if args.nodes and not args.s3:
        bench_cli.fail(f"--nodes {args.nodes}: needs --s3 (the nodes share nothing but a bucket)")
    placed = ["scaling.resources_per_worker={trainer: 1}"] if args.nodes else []
    config = task_config(Path(args.shared).resolve(), 20, 16)  # (checked before writing)
    out = Path(tempfile.mkdtemp(prefix="muppet-command-time-"))
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runs: dict[int, list[dict]] = {i: [] for i in range(len(codes))}
    with s3_server() if args.s3 else contextlib.nullcontext() as s3_env:
        for repeat in range(args.repeats):
            for i, code in enumerate(codes):
                print(f"[bench] repeat {repeat + 1}/{args.repeats}: {commit(code)}", flush=True)
                log = out / f"r{repeat}-c{i}.log"
                if s3_env:
                    env = {**os.environ, **s3_env, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
                    command = [sys.executable, "-m", "muppet_ray", "prefinetune", "--config",
                               str(config_path), *[a for x in [
                                   f"run.storage_path=s3://{BUCKET}/r{repeat}-c{i}",
                                   "run.name=w2", *placed, *args.set] for a in ("--set", x)]]
                    with (multinode_cluster({**s3_env, "PYTHONPATH": str(code)}, args.nodes,
                                            out) if args.nodes else
                          contextlib.nullcontext()) as cluster:
                        if cluster:  # (the driver on the head's machine, as a user's)
                            env.update(cluster.driver_env())
                        result = run_command(command, env, log, cwd=code)
                    # (read back here as the command wrote it: this process points at the
                    # server too)
                    os.environ.update(s3_env)
                    result["phases"] = phases(result, read_log(
                        RunDir(f"s3://{BUCKET}/r{repeat}-c{i}/w2")))
                else:
                    result = muppet(code, config_path, out / f"r{repeat}-c{i}", "w2", args.set,
                                    log)
                result["own"] = next((line.strip() for _, line in result["lines"]
                                      if " s: starting Ray " in line), "")
                runs[i].append(result)
    names = ["tokenize", "start-up", "eval", "train", "after"]
    print(f"\n{args.repeats} repeat(s), medians, seconds; runs in {out}\n")
    print(f"| {'code':<10} | whole | " + " | ".join(names) + " | whole / train |")
    print("|" + "---|" * (len(names) + 3))
    for i, code in enumerate(codes):
        whole = statistics.median(r["seconds"] for r in runs[i])
        parts = [statistics.median(r["phases"].get(p, float("nan")) for r in runs[i])
                 for p in names]
        print(f"| {commit(code):<10} | {whole:.1f} | " + " | ".join(f"{v:.1f}" for v in parts)
              + f" | {whole / parts[3]:.2f} |")
    for i, code in enumerate(codes):
        for r in runs[i]:
            if r["own"]:
                print(f"{commit(code)}: {r['own']}")


if __name__ == "__main__":
    main()
