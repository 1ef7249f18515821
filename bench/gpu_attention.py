"""Where a RoBERTa-large step's time goes on one GPU, without Ray or DeepSpeed: the backbone as
muppet-ray builds it, trained on full 512-token rows in bf16 (autocast, fused AdamW), under each
attention implementation transformers offers here, eager and compiled. For issue 24 (MFU).

    python bench/gpu_attention.py [--batch 32] [--length 512] [--steps 20] [--budget-s 240]

Printed per variant: tokens/s, model FLOPs utilisation (6 x parameters x tokens/s, plus the
attention's 12 x layers x hidden x length per token, over the GPU's bf16 dense peak), peak GPU
memory; then a profile of one eager step of the default implementation, top CUDA kernels.
"""

from __future__ import annotations

import argparse
import time

import bench_cli
import torch
from transformers import RobertaConfig, RobertaModel

PEAK_TFLOPS = 989.0  # H100 / H200 bf16 dense


def build(implementation: str) -> torch.nn.Module:
    config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                           num_attention_heads=16, intermediate_size=4096,
                           max_position_embeddings=514, type_vocab_size=1,
                           attn_implementation=implementation)
    return RobertaModel(config, add_pooling_layer=False).cuda()


def step_fn(model, optimizer):
    def step(ids, mask):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = hidden.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(name: str, implementation: str, compiled: bool, args) -> None:
    torch.cuda.reset_peak_memory_stats()
    model = build(implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    params = sum(p.numel() for p in model.parameters())
    if compiled:
        model = torch.compile(model)
    step = step_fn(model, optimizer)
    ids = torch.randint(5, 50000, (args.batch, args.length), device="cuda")
    mask = torch.ones_like(ids)
    for _ in range(3):
        step(ids, mask)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(args.steps):
        step(ids, mask)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / args.steps
    tokens = args.batch * args.length / seconds
    flops = tokens * (6 * params + 12 * 24 * 1024 * args.length)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name:<22} {tokens:>10,.0f} tok/s  MFU {flops / PEAK_TFLOPS / 1e12:6.1%}  "
          f"{seconds * 1000:7.1f} ms/step  peak {peak:5.1f} GiB", flush=True)
    del model, optimizer


def profile(implementation: str, args) -> None:
    model = build(implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step = step_fn(model, optimizer)
    ids = torch.randint(5, 50000, (args.batch, args.length), device="cuda")
    mask = torch.ones_like(ids)
    for _ in range(2):
        step(ids, mask)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(ids, mask)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    bench_cli.positive(batch=args.batch, length=args.length, steps=args.steps)
    began = time.monotonic()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch} x "
          f"{args.length} tokens, RoBERTa-large backbone", flush=True)
    default = RobertaModel(RobertaConfig(num_hidden_layers=1)).config._attn_implementation
    print(f"transformers' default attention implementation here: {default}", flush=True)
    variants = [("eager", "eager", False), ("sdpa", "sdpa", False),
                ("flash_attention_2", "flash_attention_2", False),
                ("sdpa + torch.compile", "sdpa", True)]
    for name, implementation, compiled in variants:
        if time.monotonic() - began > args.budget_s:
            print(f"{name}: skipped (budget)")
            continue
        try:
            measure(name, implementation, compiled, args)
        except Exception as e:  # (an implementation this machine lacks)
            print(f"{name:<22} unavailable: {str(e).splitlines()[0][:120]}", flush=True)
        torch.cuda.empty_cache()
    if time.monotonic() - began < args.budget_s:
        profile(default, args)


if __name__ == "__main__":
    main()
