"""Validation during training: every task's metrics, computed across all workers.

Each worker scores its share of the validation chunks (data.eval_chunks: even work, and the
same number of forward passes everywhere, which ZeRO-3 needs); the task types' statistics are
summed over the workers, and the pairs that some metrics need (predictions with their targets)
gathered, before each task type turns them into its metrics (task_types.py).
"""

from __future__ import annotations

import numpy as np
import torch

from muppet_ray import batch as mb
from muppet_ray import data
from muppet_ray.step import passes
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import HeadLayout
from muppet_ray.workers import Workers


class Evaluator:
    def __init__(self, engine, layouts: list[HeadLayout], caches: list[data.CacheIndex],
                 workers: Workers, max_tokens_per_pass: int | None, zero3: bool):
        self.engine, self.layouts, self.caches, self.workers = engine, layouts, caches, workers
        self.max_tokens_per_pass = max_tokens_per_pass
        self.zero3 = zero3  # (then every worker makes as many passes as the largest chunk needs)
        self.keeps_pairs = any(TASK_TYPES[t.type].keeps_pairs for t in layouts)

    @torch.no_grad()
    def __call__(self) -> dict[str, dict[str, float]]:
        """Every task's validation metrics. Batches are read as they are needed: keeping them
        would hold every validation split in each worker."""
        self.engine.eval()
        stats, pairs = None, {}
        generating = [t.type == "generation" for t in self.layouts]
        for task, chunk, counted, turn_cost in data.eval_chunks(
                self.caches, self.workers.rank, self.workers.world, generating):
            batch = data.ChunkReader.read(self.caches[task], chunk, task)
            cost = turn_cost if self.zero3 else batch["attention_mask"].size
            for piece, share in passes(batch, cost, self.max_tokens_per_pass, self.zero3):
                # (the module's own method: DeepSpeed's hooks on its submodules still gather
                # ZeRO-3's parameters)
                values = self.engine.module.evaluate(mb.to_torch(piece, self.workers.device))
                kept = counted and share > 0  # (a padding piece keeps ZeRO-3's passes in step)
                values = values.double().cpu() * kept
                stats = values if stats is None else stats + values
                taken = self.engine.module.take_pairs()  # (taken always: they are per pass)
                for pair_task, found in taken.items() if kept else ():
                    pairs.setdefault(pair_task, []).append(found)
        self.engine.train()
        stats = self.workers.all_reduce(stats).numpy()
        if self.keeps_pairs and self.workers.world > 1:
            every = self.workers.gather(pairs)
            pairs = {task: [p for mine in every for p in mine.get(task, [])]
                     for task in range(len(self.layouts))}
        return {t.name: TASK_TYPES[t.type].finalize(
            stats[i], np.concatenate(pairs[i]) if pairs.get(i) else None)
            for i, t in enumerate(self.layouts)}
