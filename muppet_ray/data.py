"""Data on Ray Data, in two stages.

1. `prepare` (driver, before training): every task is read, tokenized and collated into
   single-task chunks of `micro_batch_size` examples (fewer at the end of a split) by Ray Data
   `map_batches`, and written to `<run>/data/<task>/<split>/` as Parquet, one chunk per row
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
from muppet_ray.config import Config
from muppet_ray.errors import DataError, unwrap_data_error
from muppet_ray.mixture import Schedule
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import Task

FETCH_BLOCK = 32  # micro-batches per Ray Data block in the training stream
CHUNKS_PER_BLOCK = 64  # chunks per Ray Data block when writing the cache
CONCURRENT_WRITES = 4  # tasks and splits tokenized at once
CACHE_FORMAT = 6  # bump when the chunk rows change: older caches are then rebuilt
CHUNK_COLUMNS = ["num_examples", "num_tokens", "padded_tokens", "payload"]


@dataclass(frozen=True)
class ChunkSettings:
    """How tasks become chunks (everything that shapes the cache)."""

    limits: Limits
    chunk_size: int  # examples per training chunk
    eval_chunk_size: int
    seed: int  # training.seed: the order of training examples and the training subset
    max_eval_examples: int | None = None
    data_seed: int = 0  # which validation examples a capped split keeps
    train_fraction: float = 1.0

    @staticmethod
    def from_config(config: Config) -> ChunkSettings:
        model, batching = config.model, config.batching
        chunk_size = batching.micro_batch_size
        if batching.strategy == "mixed":  # a micro-batch is made of several smaller chunks
            chunk_size //= batching.tasks_per_micro_batch
        return ChunkSettings(
            Limits(model.max_length, model.max_target_length, model.doc_stride), chunk_size,
            batching.eval_batch_size, config.training.seed, config.training.max_eval_examples,
            config.tasks.data_seed, config.tasks.train_fraction)


@dataclass(frozen=True)
class CacheIndex:
    """Where the chunks of one task's split are: files in order, and in each the row groups
    that hold a chunk (one left empty by skipped rows holds none)."""

    directory: str  # URI
    files: tuple[tuple[str, tuple[int, ...]], ...]  # (file name, row groups with a chunk)
    examples: int
    skipped: int = 0  # bad rows left out (tasks.skip_bad_rows)

    @property
    def chunks(self) -> int:
        return sum(len(groups) for _, groups in self.files)

    def locate(self, chunk: int) -> tuple[str, int]:
        for name, groups in self.files:
            if chunk < len(groups):
                return f"{self.directory}/{name}", groups[chunk]
            chunk -= len(groups)
        raise IndexError(f"chunk {chunk} beyond the end of {self.directory}")


# ------------------------------------------------------------------------------ stage 1


def _chunker(task: Task, task_index: int, split: str, tokenizer, settings: ChunkSettings):
    def featurize(rows: list[dict[str, Any]]):
        examples = [task.source.decode(row, split) for row in rows]
        return task.task_type.featurize(task, examples, tokenizer, settings.limits)

    def make_chunk(table: pa.Table) -> dict[str, list]:
        rows, skipped = table.to_pylist(), 0
        try:
            features = featurize(rows)
        except DataError:
            if not task.skip_bad_rows:
                raise
            features = []
            for row in rows:  # find the bad rows one by one, keep the rest
                try:
                    features += featurize([row])
                except DataError:
                    skipped += 1
        chunk = mb.collate(features, task_index, tokenizer.pad_token_id,
                           keep_text=split == "validation") if features else None
        return {
            "num_examples": [len(features)],
            "num_tokens": [int(chunk["attention_mask"].sum()) if chunk else 0],
            "padded_tokens": [int(chunk["attention_mask"].size) if chunk else 0],
            "skipped": [skipped],
            "payload": [mb.to_bytes(chunk) if chunk else b""],
        }

    return make_chunk


def _fingerprint(task: Task, split: str, tokenizer, settings: ChunkSettings) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    key = repr((CACHE_FORMAT, task, task.source, split, vocab, settings))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare(tasks: list[Task], run_dir: RunDir, tokenizer, settings: ChunkSettings,
            splits: tuple[str, ...] = ("train", "validation"),
            ) -> dict[str, dict[str, CacheIndex]]:
    """Tokenize every task's splits (train and validation) into the run's chunk cache."""
    wanted, pending = {}, []
    for index, task in enumerate(tasks):
        for split in splits:
            fingerprint = _fingerprint(task, split, tokenizer, settings)
            wanted[task.name, split] = fingerprint
            existing = _read_index(run_dir, task.name, split)
            if existing is None or existing[1] != fingerprint:
                pending.append((index, task, split))
    if pending:
        _write_chunks(pending, run_dir, tokenizer, settings)
        for _, task, split in pending:
            _write_index(run_dir, task.name, split, wanted[task.name, split])
    caches: dict[str, dict[str, CacheIndex]] = {}
    for task in tasks:
        for split in splits:
            index = _read_index(run_dir, task.name, split)[0]
            if index.examples == 0:
                raise DataError(f"task {task.name!r}: the {split} split has no examples")
            caches.setdefault(task.name, {})[split] = index
    return caches


def _write_chunks(pending, run_dir: RunDir, tokenizer, settings: ChunkSettings) -> None:
    """One Ray Data job per task and split, a few at a time, each driven from its own Ray task
    (no CPU reserved: the job's own tasks do the work). A single job over the union of all of
    them deadlocked the streaming executor on few CPUs (many branches, all-to-all shuffles,
    preserved order); driving them from threads of one process raced in Ray's imports."""
    write = ray.remote(num_cpus=0, max_retries=0)(_write_split)
    waiting = [(index, task, split) for index, task, split in pending]
    running = []
    try:
        while waiting or running:
            while waiting and len(running) < CONCURRENT_WRITES:
                index, task, split = waiting.pop(0)
                running.append(write.remote(index, task, split, run_dir.root, tokenizer,
                                            settings))
            done, running = ray.wait(running, num_returns=1)
            ray.get(done)
    except Exception as e:  # a DataError raised inside a Ray task arrives wrapped
        for ref in running:
            ray.cancel(ref)
        # Wait until the cancelled writers are gone: the caller removes the run directory next,
        # and a writer still running would put files back into it (seen under load in CI).
        if running:
            ray.wait(running, num_returns=len(running), timeout=120)
        raise unwrap_data_error(e) from None


def _write_split(index: int, task: Task, split: str, run_root: str, tokenizer,
                 settings: ChunkSettings) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_dir = RunDir(run_root)
    size = settings.chunk_size if split == "train" else settings.eval_chunk_size
    directory = _cache_dir(task.name, split)
    run_dir.remove(directory)
    ds = task.source.read(split)
    if split == "train" and settings.train_fraction < 1:
        ds = _subset(ds, settings.train_fraction, settings.seed)
    capped = split == "validation" and settings.max_eval_examples is not None
    if not task.source.shuffled and (split == "train" or capped):
        # (a capped validation split is a random sample too: files are often sorted by label)
        seed = settings.seed if split == "train" else settings.data_seed
        ds = ds.random_shuffle(seed=seed * 1009 + index)
    if capped:
        ds = ds.limit(settings.max_eval_examples)
    # Chunk boundaries at exact multiples of the chunk size in a fixed row order, so the same
    # inputs always give the same chunks (map_batches alone cuts short batches wherever Ray
    # happens to bundle blocks).
    ds = ds.repartition(target_num_rows_per_block=size * CHUNKS_PER_BLOCK, strict=True)
    ds = ds.map_batches(_chunker(task, index, split, tokenizer, settings), batch_size=size,
                        batch_format="pyarrow")
    ds.context.execution_options.preserve_order = True
    # Ray Data logs a failing job itself; bad data should read as one line on the driver (the
    # error still propagates; anything else keeps its traceback). Set after the dataset is
    # built: Ray Data configures its logger when it first needs it.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ds.write_parquet(run_dir.uri(directory), row_group_size=1)


def _subset(ds, fraction: float, seed: int):
    """round(fraction x N) examples (at least 1): those with the smallest seeded draw of their
    id. The same seed ranks examples the same way, so smaller fractions nest in larger ones."""
    keep = max(1, round(fraction * ds.count()))

    def draw(batch: pa.Table) -> pa.Table:
        draws = [int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest(),
                                "big") for i in batch["_id"].to_pylist()]
        return batch.append_column("_draw", pa.array(draws, pa.uint64()))

    ds = ds.map_batches(draw, batch_format="pyarrow").sort("_draw").limit(keep)
    return ds.drop_columns(["_draw"])


def _cache_dir(task: str, split: str) -> str:
    return f"data/{task}/{split}"


def _write_index(run_dir: RunDir, task: str, split: str, fingerprint: str) -> None:
    directory = _cache_dir(task, split)
    files, examples, skipped = [], 0, 0
    for name in sorted(run_dir.list(directory)):
        if not name.endswith(".parquet"):
            continue
        with run_dir.open_input(f"{directory}/{name}") as f:
            counts = pq.ParquetFile(f).read(columns=["num_examples", "skipped"]).to_pydict()
        files.append((name, [g for g, n in enumerate(counts["num_examples"]) if n]))
        examples += sum(counts["num_examples"])
        skipped += sum(counts["skipped"])
    # Written last: a cache without its index is incomplete and gets rebuilt.
    run_dir.write_text(f"{directory}/index.json", json.dumps(
        {"fingerprint": fingerprint, "files": files, "examples": examples, "skipped": skipped}))


def _read_index(run_dir: RunDir, task: str, split: str) -> tuple[CacheIndex, str] | None:
    directory = _cache_dir(task, split)
    if not run_dir.exists(f"{directory}/index.json"):
        return None
    raw = json.loads(run_dir.read_text(f"{directory}/index.json"))
    files = tuple((name, tuple(groups)) for name, groups in raw["files"])
    index = CacheIndex(run_dir.uri(directory), files, raw["examples"], raw["skipped"])
    return index, raw["fingerprint"]


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


def stream(schedule: Schedule, rank: int, world_size: int, start_step: int,
           caches: list[CacheIndex], pad_id: int) -> Iterator[dict[str, Any]]:
    """This worker's micro-batches from `start_step` on, in schedule order, via Ray Data."""
    positions = schedule.worker_positions(rank, world_size, start_step)
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
