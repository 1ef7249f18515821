"""Hooks into the training loop, for what is not training: diagnostics (transfer.py) and the
tests' fault injection (faults.py). The loop calls each hook at the same point on every worker;
a run without them pays nothing for them."""

from __future__ import annotations

import contextlib

from muppet_ray import batch as mb


class Callback:
    def before_step(self, step: int) -> None:
        """Before optimizer step `step` (0-based) begins."""

    def micro_batch(self, batch: mb.Batch) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward passes."""
        return contextlib.nullcontext()

    def after_evaluation(self, step: int) -> None:
        """After the evaluation at `step` (every worker, a collective call is allowed)."""

    def checkpoint_upload(self, step: int):
        """Ray Train's `checkpoint_upload_fn` for the checkpoint of `step`, or None (its own)."""
        return None
