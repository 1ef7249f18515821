"""The optimizer, its learning-rate schedule, and the DeepSpeed config that wraps them."""

from __future__ import annotations

from typing import Any

import torch

from muppet_ray.config import Config


def deepspeed_config(config: Config, world_size: int, grad_accum: int, bf16: bool,
                     load_universal: bool = False) -> dict[str, Any]:
    """`grad_accum`: micro-batches per worker per step at this world size (elastic runs
    accumulate more with fewer workers; train.py)."""
    ds = {
        "train_micro_batch_size_per_gpu": config.batching.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": config.batching.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": config.training.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
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
    torch's single-kernel AdamW (for GPUs: one launch instead of one per parameter)."""
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
