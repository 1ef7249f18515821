"""The optimizer, its learning-rate schedule, and the DeepSpeed config that wraps them."""

from __future__ import annotations

from typing import Any

import torch

from muppet_ray.config import Config, micro_batches_per_step


def deepspeed_config(config: Config, world_size: int, bf16: bool,
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
