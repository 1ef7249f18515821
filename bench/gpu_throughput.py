"""The real path on one GPU: Ray Train + DeepSpeed + the Ray Data stream, RoBERTa-sized encoders.

    python bench/gpu_throughput.py [--workloads long,mix] [--sizes large] [--zero 2,3,auto]
                                   [--attention packed,padded] [--steps 60] [--out DIR]
                                   [--set training.compile=true ...]
    python bench/gpu_throughput.py --dry-run      # the same on the CPU, tiny, to check the script

Workloads: `long`, two generated classification tasks whose rows are 600 whitespace words (512
tokens after truncation, no padding: the matrix products' own speed); `mix`, the real BIG-bench
classification and multiple-choice tasks of jobs/configs/real-all.yaml (short rows of mixed
lengths: what packing is for), read from --shared (on a lent GPU, unpacked from
.gpu/shared-mix.tar.xz by gpu_lease.sh); `suite`, the built-in encoder-only suite. For each
workload, size (roberta-base: 12 x 768, roberta-large: 24 x 1024, built from config), ZeRO stage
and attention (model.attention), `muppet-ray prefinetune` runs on one GPU in bf16 (fused AdamW),
then bench/bare_loop.py trains a bare PyTorch loop (bf16 autocast, fused AdamW, padded) on the
very same micro-batches. Printed per run: real tokens/s; model FLOPs utilisation on real tokens
only, as 6 x parameters (MFU 6N) and with attention's 12 x layers x width x row length per token
(MFU +attn), over the GPU's bf16 dense peak; the ratio to the bare loop; peak GPU memory; and the
whole command's time over its training time. Needs Ray, DeepSpeed and a GPU.
Each row is printed (and appended to DIR/results.jsonl) as soon as its run ends, and no run starts
after --budget-s, so that a lease that runs out still leaves the rows measured so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = {  # hidden, layers, heads, ffn
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "tiny": (64, 2, 4, 128),  # --dry-run
}
MIX_CONFIG = ROOT / "jobs/configs/real-all.yaml"
# The pool's BIG-bench classification and multiple-choice tasks (the QA tasks and the CSV one
# left out: what .gpu/shared-mix.tar.xz carries).
MIX_TASKS = [
    "hyperbaton", "movie_dialog", "formal_fallacies", "fever", "politifact", "play_dialog",
    "winowhy", "logical_fallacy_detection", "epistemic_reasoning", "navigate",
    "sports_understanding", "implicatures", "vitaminc", "multiemo", "step_ordering",
    "unit_identification", "timedial", "step_inference", "colored_objects", "social_iqa",
    "question_selection", "shuffled_objects", "narrative_understanding", "temporal_sequences",
    "discourse_marker", "logical_deduction"]
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def run(argv: list[str], log: Path, extra_env: dict[str, str]) -> str | None:
    """Runs one command, its output to `log`; None (and the log's tail printed) if it failed."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **extra_env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        print(f"bench: {' '.join(argv[:4])} ... failed (exit {done.returncode}), see {log}:\n"
              f"{tail}", flush=True)
        return None
    return done.stdout


HEADER = (f"{'run':<26} {'params':>8} {'real tok/s':>11} {'MFU 6N':>7} {'MFU +attn':>9} "
          f"{'vs bare':>8} {'GPU peak MB':>12} {'bare MFU':>9} {'cmd/train':>9}")


def format_row(r: dict) -> str:
    return (f"{r['run']:<26} {r['parameters'] / 1e6:>7.1f}M {r['real_tokens_per_s']:>11,.0f} "
            f"{r['mfu']:>7.1%} {r['mfu_attention']:>9.1%} {r['vs_bare']:>8.3f} "
            f"{r['gpu_peak_mb']:>12,.0f} {r['bare_mfu']:>9.1%} {r['command_per_train']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="long,mix")
    parser.add_argument("--sizes", default="large")
    parser.add_argument("--zero", default="2,3")
    parser.add_argument("--attention", default="packed,padded")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get(
        "MUPPET_SHARED", ROOT.parent / "shared")), help="holds data/bigbench (mix)")
    parser.add_argument("--out", type=Path, help="runs, logs, results.jsonl (default: temp)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no run after this many seconds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more settings for every run (e.g. training.compile=true, or "
                        "ZeRO-3's buckets through deepspeed.config)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 6 steps")
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps, micro_batch=args.micro_batch, accum=args.accum)
    for option, text, allowed in (("--workloads", args.workloads, ("long", "mix", "suite")),
                                  ("--sizes", args.sizes, SIZES),
                                  ("--zero", args.zero, ("auto", "0", "1", "2", "3")),
                                  ("--attention", args.attention, ("packed", "padded"))):
        bench_cli.listed(option, text, allowed)
    if args.dry_run:
        args.sizes, args.steps, args.zero, args.micro_batch, args.accum = "tiny", 6, "auto", 8, 2
    began = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="muppet-gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    peak = peak_tflops()
    print(f"bench: {_device_name()}, bf16 peak {peak or 'unknown'} TFLOPS; out {out}", flush=True)
    rows = []
    for workload in args.workloads.split(","):
        for size in args.sizes.split(","):
            for zero in args.zero.split(","):
                for attention in args.attention.split(","):
                    name = f"{workload}-{size}-z{zero}-{attention}"
                    if time.monotonic() - began > args.budget_s:
                        print(f"bench: budget of {args.budget_s:.0f} s spent, {name} not run")
                        continue
                    row = measure(args, workload, size, zero, attention, name, out, peak)
                    if row:
                        rows.append(row)
                        print(HEADER + "\n" + format_row(row), flush=True)
                        print(f"  {row['time_line']}", flush=True)  # (where the command went)
                        with (out / "results.jsonl").open("a") as f:
                            f.write(json.dumps(row) + "\n")
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    print(f"({len(rows)} runs in {time.monotonic() - began:.0f} s; runs and logs in {out})")


def workload_settings(args, workload: str, out: Path) -> tuple[list[str], dict[str, str]]:
    """The config (--config and --set) and environment of a workload."""
    if workload == "suite":
        return ["--config", str(ROOT / "jobs/configs/encoder-only.yaml")], {}
    if workload == "mix":
        if not (args.shared / "data" / "bigbench").is_dir():
            raise SystemExit(f"bench: --shared {args.shared}: no data/bigbench there (mix)")
        tasks = MIX_TASKS[:4] if args.dry_run else MIX_TASKS
        return ["--config", str(MIX_CONFIG), "--set", "model.pretrained=null",
                "--set", f"tasks.include=[{', '.join(tasks)}]", "--set",
                "model.vocab_size=8000"], {"MUPPET_SHARED": str(args.shared.resolve())}
    words, rows, length = (60, 200, 64) if args.dry_run else (600, 6000, 512)
    specs = [long_task(out, name, words, rows) for name in ("long_a", "long_b")]
    return ["--set", f"tasks.custom={json.dumps(specs)}", "--set",
            "tasks.include=[long_a, long_b]", "--set", f"model.max_length={length}",
            "--set", "model.vocab_size=8000"], {}


def long_task(out: Path, name: str, words: int, rows: int) -> dict:
    """A classification task of `rows` rows of `words` random words (generated here, so nothing
    has to be carried to the GPU machine)."""
    path = out / "long" / f"{name}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(name)
        vocabulary = [f"w{i}" for i in range(5000)]
        with path.open("w") as f:
            for _ in range(rows):
                text = " ".join(rng.choice(vocabulary) for _ in range(words))
                f.write(json.dumps({"text": text, "label": rng.choice(["yes", "no"])}) + "\n")
    return {"name": name, "type": "classification", "train": str(path), "labels": ["no", "yes"]}


def measure(args, workload: str, size: str, zero: str, attention: str, name: str, out: Path,
            peak: float | None) -> dict | None:
    hidden, layers, heads, ffn = SIZES[size]
    config, env = workload_settings(args, workload, out)
    settings = [
        "model.arch=roberta", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.num_heads={heads}", f"model.ffn_size={ffn}", "model.dropout=0.1",
        f"model.attention={attention}",
        f"batching.micro_batch_size={args.micro_batch}", f"batching.grad_accum_steps={args.accum}",
        "batching.max_tokens_per_pass=0",  # (the GPU holds a whole micro-batch's activations)
        f"training.max_steps={args.steps}", f"training.warmup_steps={args.steps // 10}",
        "training.learning_rate=1e-4", f"training.log_every={max(1, args.steps // 6)}",
        f"training.checkpoint_every={args.steps}", "training.max_eval_examples=64",
        f"deepspeed.zero_stage={zero}", "scaling.num_workers=1",
        f"run.storage_path={out}", f"run.name={name}",
    ]
    if not args.dry_run:
        settings += ["scaling.use_gpu=true", "deepspeed.precision=bf16"]
    settings += args.set
    started = time.monotonic()
    if run([sys.executable, "-m", "muppet_ray", "prefinetune", *config,
            *[a for s in settings for a in ("--set", s)]], out / f"{name}.log", env) is None:
        return None
    command_s = time.monotonic() - started
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    steady = train[1:] or train  # (the first window: warm-up)
    real = statistics.mean(r["tokens_per_s"] for r in steady)
    examples_per_step = args.micro_batch * args.accum
    train_s = sum((r["step"] - before) * examples_per_step / r["examples_per_s"]
                  for r, before in zip(train, [0] + [r["step"] for r in train]))
    device = [] if args.dry_run else ["--device", "cuda", "--bf16"]
    bare_out = run([sys.executable, str(HERE / "bare_loop.py"), str(out / name),
                    "--steps", str(min(args.steps, 40)), *device], out / f"{name}-bare.log", env)
    if bare_out is None:
        return None
    bare = json.loads(bare_out.strip().splitlines()[-1])
    parameters = _parameters(out / name / "export")
    # attention: 12 x layers x width x (its row's length) FLOPs per real token
    attention_flops = 12 * layers * hidden * bare["attention_row_tokens"]
    return {
        "run": name, "parameters": parameters, "real_tokens_per_s": real,
        "mfu": _mfu(6 * parameters, real, peak),
        "mfu_attention": _mfu(6 * parameters + attention_flops, real, peak),
        "vs_bare": real / bare["tokens_per_s"],
        "gpu_peak_mb": max(r.get("gpu_peak_mb", 0.0) for r in train),
        "bare_real_tokens_per_s": bare["tokens_per_s"],
        "bare_mfu": _mfu(6 * parameters, bare["tokens_per_s"], peak),
        "bare_gpu_peak_mb": bare.get("gpu_peak_mb", 0.0), "command_s": command_s,
        "train_s": train_s, "command_per_train": command_s / train_s,
        "zero_chosen": _zero_chosen(out / f"{name}.log"),
        "time_line": _time_line(out / f"{name}.log"),
        "micro_batch": args.micro_batch, "accum": args.accum, "steps": args.steps,
        "device": _device_name(),
    }


def _time_line(log: Path) -> str:
    """The command's own line of where its time went (starting Ray, tokenizing, ...)."""
    return next((x.strip() for x in log.read_text().splitlines() if " s: starting Ray " in x), "")


def _zero_chosen(log: Path) -> str:
    line = next((x for x in log.read_text().splitlines() if "zero_stage auto:" in x), "")
    return line.split("zero_stage auto:", 1)[-1].strip()


def _mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float:
    return flops_per_token * tokens_per_s / (peak * 1e12) if peak else float("nan")


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
