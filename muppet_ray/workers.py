"""This worker's place among the run's workers, and the collectives they take decisions with.

Every decision that changes what a worker does next (stop, skip a step, which checkpoint to
resume from) is taken from values all workers share, so that all of them take it at the same
step: Ray Train and DeepSpeed both hang if one worker leaves a collective the others entered.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Workers:
    rank: int
    world: int
    local_world: int  # workers on this node
    device: torch.device

    @classmethod
    def of_this_run(cls) -> Workers:
        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(),
                   context.get_local_world_size(), ray.train.torch.get_device())

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`op` ("sum", "max" or "min") over the workers; the result on the CPU."""
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values, op=_OPS[op])
        return values.cpu()

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any worker."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), "max").item())

    def sum_parts(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each part summed over the workers, in one all-reduce; in float64 on the CPU."""
        total = self.all_reduce(torch.cat([p.to(self.device).double().flatten()
                                           for p in parts.values()]))
        return dict(zip(parts, total.split([p.numel() for p in parts.values()])))

    def gather(self, value) -> list:
        """Every worker's `value` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        every = [None] * self.world
        dist.all_gather_object(every, value)
        return every

    def from_rank0(self, value):
        """Rank 0's `value`, on every worker."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
