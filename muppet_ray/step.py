"""A training step's work on one micro-batch, shared by every training loop: pre-finetuning and
fine-tuning runs (train.py, on DeepSpeed's engine) and the protocol's small fine-tuning runs
(protocol.py, on `SingleDeviceEngine`).

A micro-batch larger than `batching.max_tokens_per_pass` goes through the model in several
passes of whole examples, each pass's loss weighted by its share of the examples: activation
memory is bounded and the gradient is the micro-batch's own.
"""

from __future__ import annotations

import torch

from muppet_ray import batch as mb
from muppet_ray.config import Config
from muppet_ray.optim import build_optimizer


def passes(batch: mb.Batch, cost: int, budget: int | None, same_count: bool = False
           ) -> list[tuple[mb.Batch, float]]:
    """The micro-batch as pieces to run one at a time, with each one's share of its examples:
    as many as `cost` (padded tokens) needs at `budget` tokens a pass, at most one per example
    unless `same_count` (ZeRO-3, whose workers must all make the same number)."""
    count = -(-int(cost) // budget) if budget else 1
    return mb.split(batch, count if same_count else min(count, mb.num_examples(batch)))


def forward_backward(engine, pieces: list[tuple[mb.Batch, float]], weight: float,
                     device: torch.device, sums: dict[str, torch.Tensor] | None = None) -> None:
    """Forward and backward over the pieces, the micro-batch's mean loss weighted by `weight`
    (its share of the step). `sums`: the step's loss sums, added to on the device."""
    for piece, share in pieces:
        out = engine(mb.to_torch(piece, device))
        engine.backward(out["loss"] * (share * weight))
        if sums is not None and share:  # (a share-0 piece only keeps ZeRO-3's passes in step)
            sums["loss"] += out["loss"].detach() * share
            sums["task_loss"] += out["task_loss_sum"]
            sums["task_scaled_loss"] += out["task_scaled_loss_sum"]
            sums["task_examples"] += out["task_examples"]


def uses_bf16(config: Config, device: torch.device) -> bool:
    """`deepspeed.precision`: bf16 where asked, or by default on GPUs."""
    precision = config.deepspeed.precision
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class SingleDeviceEngine:
    """What the training loops call of DeepSpeed's engine (call, backward, step), for one
    process on one device: the protocol's fine-tuning runs are too small to pay for a process
    group and DeepSpeed's set-up. The same optimizer and schedule, bf16 autocast where DeepSpeed
    would train in bf16, gradients clipped as DeepSpeed clips them. AdamW is torch's fused
    kernel on every device: on a CPU, torch's default (a loop over the parameters) took 41% of a
    protocol run's time, fused about a quarter of that (bench/protocol_run.py)."""

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device):
        self.module = model.to(device)
        self.device = device
        self.optimizer, self.scheduler = build_optimizer(model, config, fused=True)
        self.grad_clip = config.training.grad_clip
        self.bf16 = uses_bf16(config, device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self, inputs: dict) -> dict:
        with self.autocast():
            return self.module(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
