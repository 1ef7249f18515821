"""The real path on one GPU: Ray Train + DeepSpeed + the Ray Data stream, RoBERTa-sized encoders.

    python bench/gpu_throughput.py [--steps 100] [--sizes large,base] [--zero 2,3] [--out DIR]
    python bench/gpu_throughput.py --dry-run      # the same on the CPU, tiny, to check the script

For each size (roberta-base: 12 x 768, roberta-large: 24 x 1024, built from config) and ZeRO
stage, `muppet-ray prefinetune` runs the encoder-only built-in suite on one GPU in bf16 (fused
AdamW), then bench/bare_loop.py trains a bare PyTorch loop (bf16 autocast, fused AdamW) on the
very same micro-batches. Printed per run: steady tokens/s (padded: what the GPU computes; real:
without padding), model FLOPs utilisation = 6 x parameters x padded tokens/s / the GPU's bf16
dense peak, the ratio to the bare loop, and peak GPU memory. Needs Ray, DeepSpeed and a GPU.
Each row is printed (and appended to DIR/results.jsonl) as soon as its run ends, and no run starts
after --budget-s, so that a lease that runs out still leaves the rows measured so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = {  # hidden, layers, heads, ffn
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "tiny": (64, 2, 4, 128),  # --dry-run
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def run(argv: list[str], log: Path) -> str | None:
    """Runs one command, its output to `log`; None (and the log's tail printed) if it failed."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        print(f"bench: {' '.join(argv[:4])} ... failed (exit {done.returncode}), see {log}:\n"
              f"{tail}", flush=True)
        return None
    return done.stdout


HEADER = (f"{'run':<14} {'params':>8} {'real tok/s':>11} {'padded tok/s':>13} {'MFU':>6} "
          f"{'vs bare':>8} {'GPU peak MB':>12} {'bare MFU':>9} {'bare GPU MB':>12}")


def format_row(r: dict) -> str:
    return (f"{r['run']:<14} {r['parameters'] / 1e6:>7.1f}M {r['real_tokens_per_s']:>11,.0f} "
            f"{r['padded_tokens_per_s']:>13,.0f} {r['mfu']:>6.1%} {r['vs_bare']:>8.3f} "
            f"{r['gpu_peak_mb']:>12,.0f} {r['bare_mfu']:>9.1%} {r['bare_gpu_peak_mb']:>12,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sizes", default="large,base")
    parser.add_argument("--zero", default="2,3")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, help="runs, logs, results.jsonl (default: temp)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no run after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 6 steps")
    args = parser.parse_args()
    if args.dry_run:
        args.sizes, args.steps, args.zero = "tiny", 6, "2"
    began = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="muppet-gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    peak = peak_tflops()
    print(f"bench: {_device_name()}, bf16 peak {peak or 'unknown'} TFLOPS; out {out}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        for zero in args.zero.split(","):
            if time.monotonic() - began > args.budget_s:
                print(f"bench: budget of {args.budget_s:.0f} s spent, {size}-zero{zero} not run")
                continue
            row = measure(args, size, zero, out, peak)
            if row:
                rows.append(row)
                print(HEADER + "\n" + format_row(row), flush=True)
                with (out / "results.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    print(f"({len(rows)} runs in {time.monotonic() - began:.0f} s; runs and logs in {out})")


def measure(args, size: str, zero: str, out: Path, peak: float | None) -> dict | None:
    hidden, layers, heads, ffn = SIZES[size]
    name = f"{size}-zero{zero}"
    settings = [
        "model.arch=roberta", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.num_heads={heads}", f"model.ffn_size={ffn}", "model.dropout=0.1",
        f"model.max_length={args.max_length}",
        f"batching.micro_batch_size={args.micro_batch}", f"batching.grad_accum_steps={args.accum}",
        "batching.max_tokens_per_pass=0",  # (the GPU holds a whole micro-batch's activations)
        f"training.max_steps={args.steps}", f"training.warmup_steps={args.steps // 10}",
        "training.learning_rate=1e-4", f"training.log_every={max(1, args.steps // 5)}",
        f"training.checkpoint_every={args.steps}", "training.max_eval_examples=64",
        f"deepspeed.zero_stage={zero}", "scaling.num_workers=1",
        f"run.storage_path={out}", f"run.name={name}",
    ]
    if not args.dry_run:
        settings += ["scaling.use_gpu=true", "deepspeed.precision=bf16"]
    started = time.monotonic()
    if run([sys.executable, "-m", "muppet_ray", "prefinetune", "--config",
            str(ROOT / "jobs/configs/encoder-only.yaml"),
            *[a for s in settings for a in ("--set", s)]], out / f"{name}.log") is None:
        return None
    command_s = time.monotonic() - started
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"][1:]  # (the first: warm-up)
    real = statistics.mean(r["tokens_per_s"] for r in train)
    padded = statistics.mean(r["tokens_per_s"] / r["real_token_ratio"] for r in train)
    device = [] if args.dry_run else ["--device", "cuda", "--bf16"]
    bare_out = run([sys.executable, str(HERE / "bare_loop.py"), str(out / name),
                    "--steps", str(min(args.steps, 40)), *device], out / f"{name}-bare.log")
    if bare_out is None:
        return None
    bare = json.loads(bare_out.strip().splitlines()[-1])
    parameters = _parameters(out / name / "export")
    bare_padded = bare["padded_tokens_per_s"]
    return {
        "run": name, "parameters": parameters, "real_tokens_per_s": real,
        "padded_tokens_per_s": padded, "mfu": _mfu(parameters, padded, peak),
        "vs_bare": real / bare["tokens_per_s"],
        "gpu_peak_mb": max(r.get("gpu_peak_mb", 0.0) for r in train),
        "bare_real_tokens_per_s": bare["tokens_per_s"],
        "bare_mfu": _mfu(parameters, bare_padded, peak),
        "bare_gpu_peak_mb": bare.get("gpu_peak_mb", 0.0), "command_s": command_s,
        "micro_batch": args.micro_batch, "accum": args.accum, "steps": args.steps,
        "device": _device_name(),
    }


def _mfu(parameters: int, padded_tokens_per_s: float, peak: float | None) -> float:
    return 6 * parameters * padded_tokens_per_s / (peak * 1e12) if peak else float("nan")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _parameters(export: Path) -> int:
    """Parameters of the exported backbone and heads (what each token's 6 x FLOPs run over)."""
    from safetensors import safe_open

    total = 0
    for path in export.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = f.get_slice(key).get_shape()
                total += int(math.prod(shape))
    return total


if __name__ == "__main__":
    main()
