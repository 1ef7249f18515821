"""The real path on one GPU: Ray Train + DeepSpeed + the Ray Data stream, RoBERTa-sized encoders.

    python bench/gpu_throughput.py [--steps 60] [--sizes base,large] [--zero 2,3]
    python bench/gpu_throughput.py --dry-run      # the same on the CPU, tiny, to check the script

For each size (roberta-base: 12 x 768, roberta-large: 24 x 1024, built from config) and ZeRO
stage, `muppet-ray prefinetune` runs the encoder-only built-in suite on one GPU in bf16 (fused
AdamW), then bench/bare_loop.py trains a bare PyTorch loop (bf16 autocast, fused AdamW) on the
very same micro-batches. Printed per run: steady tokens/s (padded: what the GPU computes; real:
without padding), model FLOPs utilisation = 6 x parameters x padded tokens/s / the GPU's bf16
dense peak, the ratio to the bare loop, and peak GPU memory. Needs Ray, DeepSpeed and a GPU.
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


def run(argv: list[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"bench: {' '.join(argv[:5])} ... failed (exit {done.returncode}), see {log}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--zero", default="2,3")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 6 steps")
    args = parser.parse_args()
    if args.dry_run:
        args.sizes, args.steps, args.zero = "tiny", 6, "2"
    out = Path(tempfile.mkdtemp(prefix="muppet-gpu-bench-"))
    peak = peak_tflops()
    rows = []
    for size in args.sizes.split(","):
        hidden, layers, heads, ffn = SIZES[size]
        for zero in args.zero.split(","):
            name = f"{size}-zero{zero}"
            settings = [
                "model.arch=roberta", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                f"model.num_heads={heads}", f"model.ffn_size={ffn}", "model.dropout=0.1",
                f"batching.micro_batch_size={args.micro_batch}", "batching.grad_accum_steps=1",
                f"training.max_steps={args.steps}", f"training.warmup_steps={args.steps // 10}",
                "training.learning_rate=1e-4", f"training.log_every={max(1, args.steps // 6)}",
                f"training.checkpoint_every={args.steps}", "training.max_eval_examples=64",
                f"deepspeed.zero_stage={zero}", "scaling.num_workers=1",
                f"run.storage_path={out}", f"run.name={name}",
            ]
            if not args.dry_run:
                settings += ["scaling.use_gpu=true", "deepspeed.precision=bf16"]
            run([sys.executable, "-m", "muppet_ray", "prefinetune", "--config",
                 str(ROOT / "jobs/configs/encoder-only.yaml"),
                 *[a for s in settings for a in ("--set", s)]], out / f"{name}.log")
            records = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
            train = [r for r in records if r["kind"] == "train"][1:]  # (the first: warm-up)
            real = statistics.mean(r["tokens_per_s"] for r in train)
            padded = statistics.mean(r["tokens_per_s"] / r["real_token_ratio"] for r in train)
            device = [] if args.dry_run else ["--device", "cuda", "--bf16"]
            bare = json.loads(run([sys.executable, str(HERE / "bare_loop.py"), str(out / name),
                                   "--steps", str(min(args.steps, 40)), *device],
                                  out / f"{name}-bare.log").strip().splitlines()[-1])
            parameters = _parameters(out / name / "export")
            mfu = 6 * parameters * padded / (peak * 1e12) if peak else float("nan")
            rows.append((name, parameters, real, padded, mfu, real / bare["tokens_per_s"],
                         max(r.get("gpu_peak_mb", 0.0) for r in train)))
    print(f"\n{'run':<14} {'params':>8} {'real tok/s':>11} {'padded tok/s':>13} {'MFU':>6} "
          f"{'vs bare':>8} {'GPU peak MB':>12}")
    for name, parameters, real, padded, mfu, ratio, memory in rows:
        print(f"{name:<14} {parameters / 1e6:>7.1f}M {real:>11,.0f} {padded:>13,.0f} "
              f"{mfu:>6.1%} {ratio:>8.3f} {memory:>12,.0f}")
    print(f"(runs and logs in {out}; peak {peak or 'unknown'} TFLOPS bf16)")


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
