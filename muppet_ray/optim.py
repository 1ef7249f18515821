"""The optimizer, its learning-rate schedule, and the DeepSpeed config that wraps them."""

from __future__ import annotations

from typing import Any

import torch

from muppet_ray.config import Config, micro_batches_per_step


def deepspeed_config(config: Config, world_size: int, bf16: bool, zero_stage: int,
                     load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed sees one micro-step per optimizer step: each worker accumulates its share of
    the step's micro-batches itself (train.py), so that it can run a large one in several passes
    and have the gradients reduced once per step."""
    examples_per_step = micro_batches_per_step(config) * config.batching.micro_batch_size
    ds = {
        "train_micro_batch_size_per_gpu": examples_per_step // world_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": examples_per_step // world_size * world_size,
        "gradient_clipping": config.training.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, so the same code runs on CPU
        "steps_per_print": 2**62,
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(ds, config.deepspeed.config)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def build_optimizer(model: torch.nn.Module, config: Config, fused: bool = False):
    """AdamW (no decay on biases and norms) and warm-up then linear decay to zero. `fused`:
    torch's single-kernel AdamW (one pass over all parameters instead of several per parameter:
    on a GPU one launch instead of many, on a CPU about 4x faster for MiniLM's 23M)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.training.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=config.training.learning_rate,
        **({"fused": True} if fused else {}))
    warmup, total = config.training.warmup_steps, config.training.max_steps

    def warmup_then_linear_decay(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay)


# ------------------------------------------------------------- deepspeed.zero_stage: auto

HEADROOM = 0.8  # of a worker's memory: what allocator caches, buffers and kernels' workspace leave
GIB = 2**30


def worker_memory(stage: int, parameters: int, workers: int, bf16: bool,
                  activations: int) -> int:
    """Bytes a worker needs under ZeRO `stage` (ZeRO paper §3, mixed precision): the weights
    (2 bytes a parameter in bf16, 4 in fp32), fp32 gradients (4), AdamW's state (fp32 moments, 8,
    and in bf16 the fp32 master weights, 4), each divided among the workers from the stage that
    partitions it (1: optimizer state, 2: and gradients, 3: and weights), plus the largest pass's
    activations."""
    weights, gradients, optimizer = (2, 4, 12) if bf16 else (4, 4, 8)
    shards = [1 if stage < n else workers for n in (3, 2, 1)]  # weights, gradients, optimizer
    per_parameter = weights / shards[0] + gradients / shards[1] + optimizer / shards[2]
    return int(parameters * per_parameter) + activations


def activation_memory(tokens: int, layers: int, width: int, bf16: bool) -> int:
    """Activations kept for the backward of one pass of `tokens` tokens: about 34 values of
    the width per token and layer (Korthikanti et al. 2022, attention scores not kept: fused
    attention recomputes them)."""
    return tokens * layers * width * 34 * (1 if bf16 else 2)


def choose_zero_stage(parameters: int, workers: int, memory: int, bf16: bool,
                      activations: int) -> tuple[int, str]:
    """ZeRO-2 where it fits in HEADROOM of `memory` (it is as fast as plain data parallelism:
    one reduce-scatter and one all-gather per step), else ZeRO-3 (parameters gathered for every
    pass); with the reason, for the start-up line."""
    need = {stage: worker_memory(stage, parameters, workers, bf16, activations)
            for stage in (2, 3)}
    room = memory * HEADROOM
    stage = 2 if need[2] <= room else 3
    reason = (f"ZeRO-2 needs ~{need[2] / GIB:.1f} GiB, ZeRO-3 ~{need[3] / GIB:.1f} GiB of "
              f"{memory / GIB:.1f} GiB a worker ({parameters / 1e6:.0f}M parameters, "
              f"{workers} workers)")
    if need[3] > room:
        reason += ": neither fits with headroom; fewer tokens a pass "
        reason += "(batching.max_tokens_per_pass) or more workers would help"
    return stage, reason
