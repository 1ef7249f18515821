"""Micro-batches: padded numpy arrays, made once in Ray Data and stored as bytes.

Layout (R token rows, E examples, L longest row, T longest target):
    input_ids, attention_mask [R, L]    token_type_ids [R, L] (tokenizers that use them)
    row_example [R]                     which example each row belongs to (rows are grouped)
    example_task [E]                    task index in the run's task list
    example_id [E]                      the example's id in its source (for audits and evaluation)
    label [E], target [E]               class / correct choice; regression target
    start, end [E]                      answer span (token positions)
    context_start, context_end [E]      where the context is, to predict spans inside it
    decoder_labels [E, T]               generation targets (IGNORE-padded)
and, in validation chunks (to score answers on text):
    offsets [E, L, 2], context [E]      span tasks: each token's character span in the context
    answers [E]                         gold answers (span) or reference (generation), as text
Padding is dynamic: to the longest row of the micro-batch.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from muppet_ray.task_types import IGNORE, Features
from muppet_ray.task_types.span import ANSWER_SEPARATOR

Batch = dict[str, np.ndarray]
TEXT_KEYS = {"offsets", "context", "answers"}
ROW_KEYS = {"input_ids", "attention_mask", "token_type_ids", "row_example"}


def collate(features: list[Features], task_index: int | None, pad_id: int,
            keep_text: bool = False) -> Batch:
    """`task_index` None: no `example_task` yet (cached chunks; see `for_task`)."""
    rows = [row for f in features for row in f.rows]
    length = max(len(r) for r in rows)
    target_length = max([1] + [len(f.decoder_labels) for f in features])
    batch: Batch = {
        "input_ids": np.full((len(rows), length), pad_id, np.int32),
        "attention_mask": np.zeros((len(rows), length), np.int8),
        "row_example": np.repeat(np.arange(len(features), dtype=np.int32),
                                 [len(f.rows) for f in features]),
        "example_id": np.array([f.example_id for f in features], np.int64),
        "label": np.array([f.label for f in features], np.int64),
        "target": np.array([f.target for f in features], np.float32),
        "start": np.array([f.start for f in features], np.int64),
        "end": np.array([f.end for f in features], np.int64),
        "context_start": np.array([f.context_start for f in features], np.int64),
        "context_end": np.array([f.context_end for f in features], np.int64),
        "decoder_labels": np.full((len(features), target_length), IGNORE, np.int32),
    }
    if task_index is not None:
        batch = for_task(batch, task_index)
    for i, row in enumerate(rows):
        batch["input_ids"][i, : len(row)] = row
        batch["attention_mask"][i, : len(row)] = 1
    if any(f.token_types is not None for f in features):
        types = [t for f in features for t in (f.token_types or [[0] * len(r) for r in f.rows])]
        batch["token_type_ids"] = np.zeros((len(rows), length), np.int8)
        for i, row in enumerate(types):
            batch["token_type_ids"][i, : len(row)] = row
    for i, f in enumerate(features):
        batch["decoder_labels"][i, : len(f.decoder_labels)] = f.decoder_labels
    if keep_text and any(f.offsets for f in features):
        batch["offsets"] = np.zeros((len(features), length, 2), np.int32)
        for i, f in enumerate(features):
            if f.offsets:
                batch["offsets"][i, : len(f.offsets)] = f.offsets
        batch["context"] = np.array([f.context for f in features])
    if keep_text and any(f.answers for f in features):
        batch["answers"] = np.array([ANSWER_SEPARATOR.join(f.answers) for f in features])
    return batch


def for_task(batch: Batch, task_index: int) -> Batch:
    """The batch with every example tagged as task `task_index` of the run."""
    return {**batch, "example_task": np.full(num_examples(batch), task_index, np.int32)}


def merge(batches: list[Batch], pad_id: int) -> Batch:
    """One micro-batch from several (the `mixed` strategy): re-pad and concatenate."""
    if len(batches) == 1:
        return batches[0]
    length = max(b["input_ids"].shape[1] for b in batches)
    target_length = max(b["decoder_labels"].shape[1] for b in batches)
    pad_values = {"input_ids": pad_id, "decoder_labels": IGNORE}
    merged: Batch = {}
    keys = set().union(*batches) - TEXT_KEYS  # (validation chunks are never merged)
    for key in sorted(keys):
        parts = []
        for b in batches:
            value = b.get(key)
            if value is None:  # token_type_ids missing from some parts
                value = np.zeros_like(b["attention_mask"])
            if value.ndim == 2:
                width = target_length if key == "decoder_labels" else length
                value = np.pad(value, ((0, 0), (0, width - value.shape[1])),
                               constant_values=pad_values.get(key, 0))
            parts.append(value)
        merged[key] = np.concatenate(parts)
    offsets = np.cumsum([0] + [len(b["example_task"]) for b in batches[:-1]])
    merged["row_example"] = np.concatenate(
        [b["row_example"] + o for b, o in zip(batches, offsets)]).astype(np.int32)
    return merged


def split(batch: Batch, count: int) -> list[tuple[Batch, float]]:
    """The batch as `count` pieces of whole examples, each with its share of the examples (the
    shares add up to 1, so the pieces' mean losses, weighted by share, add up to the batch's).
    Each piece is padded to its own longest row. Pieces beyond the number of examples repeat the
    first example with share 0 (ZeRO-3 needs the same number of passes on every worker)."""
    total = num_examples(batch)
    if count <= 1:
        return [(batch, 1.0)]
    pieces = []
    for examples in np.array_split(np.arange(total), count):
        share = len(examples) / total
        pieces.append((select(batch, examples if len(examples) else np.arange(1)), share))
    return pieces


def select(batch: Batch, examples: np.ndarray) -> Batch:
    """The sub-batch of `examples` (consecutive indices), its rows re-padded to their longest."""
    rows = np.flatnonzero((batch["row_example"] >= examples[0])
                          & (batch["row_example"] <= examples[-1]))
    length = int(batch["attention_mask"][rows].sum(axis=1).max())
    out: Batch = {}
    for key, value in batch.items():
        if key in ROW_KEYS:
            value = value[rows]
            out[key] = value[:, :length] if value.ndim == 2 else value
        else:
            value = value[examples]
            out[key] = value[:, :length] if key == "offsets" else value
    out["row_example"] = out["row_example"] - examples[0]
    return out


def num_examples(batch: Batch) -> int:
    return len(batch["label"])


def to_bytes(batch: Batch) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **batch)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Batch:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def to_torch(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors on `device`; text and offsets stay numpy arrays (read only by the metrics)."""
    out = {k: v if k in TEXT_KEYS else torch.from_numpy(v).to(device, non_blocking=True)
           for k, v in batch.items()}
    for key in ("input_ids", "row_example", "example_task", "decoder_labels"):
        out[key] = out[key].long()
    for key in ("attention_mask", "token_type_ids"):
        if key in out:
            out[key] = out[key].long()
    return out
