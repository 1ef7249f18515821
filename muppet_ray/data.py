"""Data on Ray Data, in two stages.

1. `prepare` (driver, before training): every task is read, tokenized and collated into
   single-task chunks of `micro_batch_size` examples (fewer at the end of a split) by Ray Data
   `map_batches`, and written to `<run>/data/part=<task>.<split>/` as Parquet, one chunk per row
   group.
   A chunk is a ready, padded micro-batch. Written once per run and reused after a restart.
2. `stream` (each training worker): the worker's own positions of the mixture schedule
   (mixture.py) become a Ray Data pipeline that fetches those chunks, in order, in parallel
   across the cluster, and streams them to the worker.

Why not `Dataset.mix` over per-task pipelines: it interleaves whole blocks, so it is only as
fine as one-micro-batch blocks, and then its per-block overhead grows with the number of tasks
(measured on 2 CPUs, 30 tasks: exact shares but ~850 examples/s; see bench/mixture.py). Mixing
by schedule is exact, costs nothing per block, and lets a restarted worker start at its next
micro-batch instead of replaying the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from muppet_ray import batch as mb
from muppet_ray.errors import DataError, unwrap_data_error
from muppet_ray.mixture import Schedule
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import Task

FETCH_BLOCK = 32  # micro-batches per Ray Data block in the training stream
CHUNKS_PER_BLOCK = 64  # chunks per Ray Data block when writing the cache
CACHE_FORMAT = 2  # bump when the chunk rows change: older caches are then rebuilt
CHUNK_COLUMNS = ["num_examples", "num_tokens", "padded_tokens", "payload"]


@dataclass(frozen=True)
class CacheIndex:
    """Where the chunks of one task's split are: files in order and row groups in each."""

    directory: str  # URI
    files: tuple[tuple[str, int], ...]  # (file name, chunks in it)
    examples: int

    @property
    def chunks(self) -> int:
        return sum(n for _, n in self.files)

    def locate(self, chunk: int) -> tuple[str, int]:
        for name, count in self.files:
            if chunk < count:
                return f"{self.directory}/{name}", chunk
            chunk -= count
        raise IndexError(f"chunk {chunk} beyond the end of {self.directory}")


# ------------------------------------------------------------------------------ stage 1


def _chunker(task: Task, task_index: int, split: str, tokenizer, limits: Limits):
    def make_chunk(table: pa.Table) -> dict[str, list]:
        examples = [task.source.decode(row, split) for row in table.to_pylist()]
        features = task.task_type.featurize(task, examples, tokenizer, limits)
        chunk = mb.collate(features, task_index, tokenizer.pad_token_id,
                           keep_text=split == "validation")
        return {
            "part": [f"{task.name}.{split}"],
            "num_examples": [len(features)],
            "num_tokens": [int(chunk["attention_mask"].sum())],
            "padded_tokens": [int(chunk["attention_mask"].size)],
            "payload": [mb.to_bytes(chunk)],
        }

    return make_chunk


def _fingerprint(task: Task, split: str, tokenizer, limits: Limits, chunk_size: int, seed: int,
                 max_examples: int | None) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    key = repr((CACHE_FORMAT, task, task.source, split, vocab, limits, chunk_size, seed,
                max_examples))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare(tasks: list[Task], run_dir: RunDir, tokenizer, limits: Limits, chunk_size: int,
            eval_chunk_size: int, seed: int, max_eval_examples: int | None
            ) -> dict[str, dict[str, CacheIndex]]:
    """Tokenize every task's train and validation splits into the run's chunk cache."""
    wanted, pending = {}, []
    for index, task in enumerate(tasks):
        for split in ("train", "validation"):
            size = chunk_size if split == "train" else eval_chunk_size
            limit = max_eval_examples if split == "validation" else None
            fingerprint = _fingerprint(task, split, tokenizer, limits, size, seed, limit)
            wanted[task.name, split] = fingerprint
            existing = _read_index(run_dir, task.name, split)
            if existing is None or existing[1] != fingerprint:
                pending.append((index, task, split, size, limit))
    if pending:
        _write_chunks(pending, run_dir, tokenizer, limits, seed)
        for _, task, split, _, _ in pending:
            _write_index(run_dir, task.name, split, wanted[task.name, split])
    caches: dict[str, dict[str, CacheIndex]] = {}
    for task in tasks:
        for split in ("train", "validation"):
            index = _read_index(run_dir, task.name, split)[0]
            if index.examples == 0:
                raise DataError(f"task {task.name!r}: the {split} split has no examples")
            caches.setdefault(task.name, {})[split] = index
    return caches


def _write_chunks(pending, run_dir: RunDir, tokenizer, limits: Limits, seed: int) -> None:
    streams = []
    for index, task, split, size, limit in pending:
        run_dir.remove(_cache_dir(task.name, split))
        ds = task.source.read(split)
        if limit is not None:
            ds = ds.limit(limit)
        if split == "train" and not task.source.shuffled:
            ds = ds.random_shuffle(seed=seed * 1009 + index)
        # Chunk boundaries at exact multiples of the chunk size in a fixed row order, so the
        # same inputs always give the same chunks (map_batches alone cuts short batches
        # wherever Ray happens to bundle blocks).
        ds = ds.repartition(target_num_rows_per_block=size * CHUNKS_PER_BLOCK, strict=True)
        streams.append(ds.map_batches(_chunker(task, index, split, tokenizer, limits),
                                      batch_size=size, batch_format="pyarrow"))
    ds = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
    ds.context.execution_options.preserve_order = True
    # Ray Data logs a failing task's traceback itself; bad data should read as one line, and
    # any other error is re-raised below with its traceback intact.
    ray_data_log = logging.getLogger("ray.data")
    level, ray_data_log.level = ray_data_log.level, logging.CRITICAL
    try:
        ds.write_parquet(run_dir.uri("data"), partition_cols=["part"], row_group_size=1)
    except Exception as e:  # a DataError raised inside a Ray task arrives wrapped
        raise unwrap_data_error(e) from None
    finally:
        ray_data_log.setLevel(level)


def _cache_dir(task: str, split: str) -> str:
    return f"data/part={task}.{split}"


def _write_index(run_dir: RunDir, task: str, split: str, fingerprint: str) -> None:
    directory = _cache_dir(task, split)
    files, examples = [], 0
    for name in sorted(run_dir.list(directory)):
        if not name.endswith(".parquet"):
            continue
        with run_dir.open_input(f"{directory}/{name}") as f:
            parquet = pq.ParquetFile(f)
            files.append((name, parquet.metadata.num_row_groups))
            examples += int(sum(parquet.read(columns=["num_examples"])["num_examples"].to_pylist()))
    # Written last: a cache without its index is incomplete and gets rebuilt.
    run_dir.write_text(f"{directory}/index.json", json.dumps(
        {"fingerprint": fingerprint, "files": files, "examples": examples}))


def _read_index(run_dir: RunDir, task: str, split: str) -> tuple[CacheIndex, str] | None:
    directory = _cache_dir(task, split)
    if not run_dir.exists(f"{directory}/index.json"):
        return None
    raw = json.loads(run_dir.read_text(f"{directory}/index.json"))
    files = tuple((name, count) for name, count in raw["files"])
    return CacheIndex(run_dir.uri(directory), files, raw["examples"]), raw["fingerprint"]


# ------------------------------------------------------------------------------ stage 2


class ChunkReader:
    """Reads chunks by index; keeps recently used Parquet files open (per process)."""

    _open: OrderedDict[str, pq.ParquetFile] = OrderedDict()
    MAX_OPEN = 256

    @classmethod
    def read(cls, cache: CacheIndex, chunk: int) -> mb.Batch:
        return mb.from_bytes(cls.read_row(cache, chunk)["payload"])

    @classmethod
    def read_row(cls, cache: CacheIndex, chunk: int) -> dict[str, Any]:
        """The stored row of a chunk: its counts and its encoded payload."""
        path, row_group = cache.locate(chunk)
        parquet = cls._open.get(path)
        if parquet is None:
            parquet = pq.ParquetFile(RunDir.open_uri(path))
            cls._open[path] = parquet
            if len(cls._open) > cls.MAX_OPEN:
                cls._open.popitem(last=False)
        cls._open.move_to_end(path)
        return parquet.read_row_group(row_group, columns=CHUNK_COLUMNS).to_pylist()[0]


def _fetcher(caches: list[CacheIndex], pad_id: int):
    def fetch(items: dict[str, np.ndarray]) -> dict[str, Any]:
        payloads, examples, tokens, padded = [], [], [], []
        for tasks, chunks in zip(items["task"], items["chunk"]):
            rows = [ChunkReader.read_row(caches[t], c) for t, c in zip(tasks, chunks)]
            if len(rows) == 1:  # the usual case: the stored micro-batch goes out as it is
                row = rows[0]
                payload, tokens_padded = row["payload"], row["padded_tokens"]
            else:  # `mixed`: one micro-batch from several chunks, re-padded
                merged = mb.merge([mb.from_bytes(r["payload"]) for r in rows], pad_id)
                payload, tokens_padded = mb.to_bytes(merged), merged["attention_mask"].size
            payloads.append(payload)
            examples.append(sum(r["num_examples"] for r in rows))
            tokens.append(sum(r["num_tokens"] for r in rows))
            padded.append(tokens_padded)
        return {"position": items["position"], "task": items["task"], "chunk": items["chunk"],
                "epoch": items["epoch"], "num_examples": np.array(examples),
                "num_tokens": np.array(tokens), "padded_tokens": np.array(padded),
                "payload": np.array(payloads, dtype=object)}

    return fetch


def stream(schedule: Schedule, rank: int, start_step: int, caches: list[CacheIndex],
           pad_id: int) -> Iterator[dict[str, Any]]:
    """This worker's micro-batches from `start_step` on, in schedule order, via Ray Data."""
    positions = schedule.worker_positions(rank, start_step)
    if not len(positions):
        return iter(())
    items = [{"position": p, "task": schedule.task[p].tolist(),
              "chunk": schedule.chunk[p].tolist(), "epoch": schedule.epoch[p].tolist()}
             for p in positions]
    num_blocks = -(-len(items) // FETCH_BLOCK)
    ds = ray.data.from_items(items, override_num_blocks=num_blocks)
    ds = ds.map_batches(_fetcher(caches, pad_id), batch_size=FETCH_BLOCK, batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # schedule order is the contract
    return iter(ds.iter_rows())


def eval_chunks(caches: list[CacheIndex], rank: int, world_size: int
                ) -> list[tuple[int, int, bool]]:
    """This worker's share of every task's validation chunks as (task, chunk, counted).

    Every worker gets the same number of chunks per task, in the same task order (short shares
    repeat a chunk that is not counted), so all workers run the same task type at each call: with
    ZeRO-3 the forward passes (and generation steps) are collectives too.
    """
    plan = []
    for task, cache in enumerate(caches):
        per_worker = -(-cache.chunks // world_size)
        for i in range(per_worker):
            chunk = i * world_size + rank
            plan.append((task, chunk if chunk < cache.chunks else 0, chunk < cache.chunks))
    return plan
