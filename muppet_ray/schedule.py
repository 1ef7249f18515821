"""The run's schedule as one training worker trains it: its micro-batches step by step, what
their passes are sized by, and the stream that brings them (mixture.py draws the schedule,
data.py streams it). With an online mixture it grows by an interval at each decision."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from muppet_ray import data
from muppet_ray.config import Config, micro_batches_per_step
from muppet_ray.mixture import (
    OnlineMixture,
    Schedule,
    build_schedule,
    mixture_weights,
    weights_plot,
)
from muppet_ray.workers import Workers


class WorkerSchedule:
    """This worker's share of the schedule (the others hold theirs: all draw the same one)."""

    whole: Schedule  # every micro-batch of the run (so far, if online), in order
    positions: np.ndarray  # [steps, micro-batches]: this worker's, a row per step
    pass_cost: np.ndarray  # [steps, micro-batches]: what their passes are sized by (step.py)
    mixing: OnlineMixture | None  # mixture.rule=online: the weights decided so far

    def __init__(self, config: Config, names: list[str], caches: list[data.CacheIndex],
                 workers: Workers, zero3: bool, pad_id: int, kept_mixture: dict | None):
        self.config, self.names, self.caches = config, names, caches
        self.workers, self.zero3, self.pad_id = workers, zero3, pad_id
        self.mixing = None
        if config.mixture.rule == "online":
            sizes = {name: c.examples for name, c in zip(names, caches)}
            prior = list(mixture_weights(sizes, config.mixture).values())
            self.mixing = OnlineMixture.of_run(prior, config.mixture, kept_mixture)
        self.lay_out()

    def lay_out(self) -> None:
        config, caches = self.config, self.caches
        per_step = micro_batches_per_step(config)
        self.whole = build_schedule(
            [c.chunks for c in caches], [c.examples for c in caches], config.mixture,
            config.batching, per_step, config.training.max_steps, config.training.seed,
            self.names, self.mixing.decided if self.mixing else None)
        # Each worker's micro-batches, a row per step: the step's largest go to different
        # workers (Schedule.worker_positions), so that no worker waits long for another.
        world = self.workers.world
        cost = data.position_costs(self.whole, caches)
        every = np.stack([self.whole.worker_positions(rank, world, cost=cost)
                          for rank in range(world)]).reshape(world, -1, per_step // world)
        self.positions = every[self.workers.rank]
        # What each micro-batch's number of passes is based on: its own size, or under ZeRO-3
        # (whose passes gather parameters from all workers) the largest of the same micro-step.
        self.pass_cost = cost[every].max(axis=0) if self.zero3 else cost[self.positions]

    def stream(self, start: int) -> Iterator[dict[str, Any]]:
        """This worker's micro-batches from step `start` to the end of the schedule (so far)."""
        return data.stream(self.whole, self.positions[start:].ravel(), self.caches, self.pad_id)

    def add_losses(self, task_scaled_loss: np.ndarray, task_examples: np.ndarray) -> None:
        """A step's per-task sums over all workers: what an online mixture decides from."""
        if self.mixing:
            self.mixing.add(task_scaled_loss, task_examples)

    def due(self, step: int) -> bool:
        """Whether an online mixture decides the weights of the steps after `step`."""
        return bool(self.mixing) and self.mixing.due(step, self.config.training.max_steps)

    def weights_plot(self) -> bytes:
        return weights_plot(self.names, self.mixing.decided, self.mixing.every,
                            self.config.training.max_steps)

    def decide(self) -> list[float]:
        """The online mixture's weights for the interval that starts now; the schedule grows by
        that interval."""
        weights = self.mixing.decide()
        self.lay_out()
        return weights
