"""What every task type provides, and the per-example feature record they all produce.

A micro-batch is a flat set of token rows (one per example, or one per choice for multiple
choice), each tagged with its example and every example with its task. Every head runs on every
micro-batch (see model.py for why); each task type then reads its own examples' losses out of
its head's output and masks the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from muppet_ray.errors import DataError

if TYPE_CHECKING:
    from muppet_ray.tasks import Task

IGNORE = -100  # label value that losses skip (the PyTorch / Hugging Face convention)


@dataclass
class Features:
    """One example, tokenized: what the collator pads into a micro-batch."""

    example_id: int
    rows: list[list[int]]
    token_types: list[list[int]] | None = None
    label: int = IGNORE
    target: float = 0.0
    start: int = IGNORE
    end: int = IGNORE
    context_start: int = 0
    context_end: int = 0
    decoder_labels: list[int] = field(default_factory=list)
    # For evaluating span tasks on text: each token's character span in `context`, and the
    # gold answers (kept in validation chunks only).
    offsets: list[tuple[int, int]] | None = None
    context: str = ""
    answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_target_length: int
    doc_stride: int = 32  # tokens shared by consecutive windows of a long context


class TaskType:
    """Base class: one subclass per task type, one instance in TASK_TYPES."""

    name: ClassVar[str]
    head: ClassVar[str]  # the model head that serves this type
    required_fields: ClassVar[tuple[str, ...]]
    optional_fields: ClassVar[tuple[str, ...]] = ()
    metric: ClassVar[str]  # name of the headline validation metric
    num_stats: ClassVar[int]  # length of the per-task metric statistics vector
    keeps_pairs: ClassVar[bool] = False  # its metrics need every (prediction, target) pair

    def featurize(
        self, task: Task, rows: list[dict[str, Any]], tokenizer, limits: Limits
    ) -> list[Features]:
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
             mine: torch.Tensor):
        """Per-example (loss [E], log_n [E]); values for examples of other types are finite
        and are masked out by the caller (`mine` marks this type's examples)."""
        raise NotImplementedError

    def stats(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
              mine: torch.Tensor):
        """Per-example metric statistics [E, num_stats], summed over examples and workers."""
        raise NotImplementedError

    def finalize(self, stats: np.ndarray, pairs: np.ndarray | None = None
                 ) -> dict[str, float]:
        """Metrics from summed statistics (and, for types that keep them, every example's
        (prediction, target) pair); the first key is the headline metric."""
        raise NotImplementedError

    # Helpers shared by the task types -----------------------------------------------------

    @staticmethod
    def field(task: Task, row: dict[str, Any], name: str, kind: type | tuple[type, ...] = str):
        value = row.get(name)
        if value is None:
            raise DataError(f"{_where(task, row)}: missing field {name!r}")
        if not isinstance(value, kind):
            raise DataError(
                f"{_where(task, row)}: field {name!r} should be {_kind_name(kind)}, "
                f"got {type(value).__name__}"
            )
        return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "text", int: "an integer", float: "a number", list: "a list"}.get(
        k, k.__name__) for k in kinds)


def _where(task: Task, row: dict[str, Any]) -> str:
    return f"task {task.name!r}, {row.get('_origin', '?')}, row {row.get('_row', '?')}"


def data_error(task: Task, row: dict[str, Any], message: str) -> DataError:
    return DataError(f"{_where(task, row)}: {message}")


def log_of(n: torch.Tensor) -> torch.Tensor:
    """log(n) with n clamped to 2, so a degenerate output space never divides by zero."""
    return torch.log(n.clamp(min=2).to(torch.float32))


LOG2 = math.log(2)


def encode(tokenizer, first: list[str], second: list[str] | None, max_length: int, **kwargs):
    """Tokenize a batch of texts or text pairs; returns the tokenizer's BatchEncoding."""
    return tokenizer(
        first,
        second,
        truncation="only_second" if kwargs.pop("only_second", False) else True,
        max_length=max_length,
        padding=False,
        **kwargs,
    )


def token_types(encoding, i: int) -> list[list[int]] | None:
    types = encoding.get("token_type_ids")
    return [types[i]] if types is not None else None
