"""Data on Ray Data, in two stages.

1. `prepare` (driver, before training): every task is read, tokenized and collated into
   single-task chunks of `micro_batch_size` examples (fewer at the end of a split; or, with
   `batching.tokens_per_micro_batch`, as many as fit that many padded tokens) by Ray Data
   `map_batches`, examples of similar length together, and written as Parquet, one chunk per
   row group, to the chunk cache `<storage>/.chunk-cache/<fingerprint>/`. A chunk is a ready,
   padded micro-batch. The fingerprint covers everything the chunks depend on (the task's spec
   and data content, the tokenizer, the chunk settings), so every run under one storage root —
   a restart, sweep points, fine-tuning runs — tokenizes a task once.
2. `stream` (each training worker): the worker's own positions of the mixture schedule
   (mixture.py) become a Ray Data pipeline that fetches those chunks, in order, in parallel
   on the worker's own node, and streams them to the worker.

Why not `Dataset.mix` over per-task pipelines: it interleaves whole blocks, so it is only as
fine as one-micro-batch blocks, and then its per-block overhead grows with the number of tasks
(measured on 2 CPUs, 30 tasks: exact shares but ~850 examples/s; see bench/mixture.py). Mixing
by schedule is exact, costs nothing per block, and lets a restarted worker start at its next
micro-batch instead of replaying the stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import posixpath
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from muppet_ray import batch as mb
from muppet_ray import runtime
from muppet_ray.config import Config
from muppet_ray.errors import DataError, unwrap_data_error
from muppet_ray.mixture import Schedule
from muppet_ray.sources import FileSource
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Features, Limits
from muppet_ray.tasks import Task
from muppet_ray.tokenizer import Shipped

FETCH_BLOCK = 32  # micro-batches per Ray Data block in the training stream
STREAM_SEGMENT = 8 * FETCH_BLOCK  # micro-batches per Ray Data execution of it (see `stream`),
STREAM_SEGMENT_TOKENS = 2**22  # and padded tokens at most (~100 MB of arrays in the object store)
CHUNKS_PER_BLOCK = 64  # chunks per Ray Data block when writing the cache
# Tasks and splits tokenized at once. Each Ray Data job spreads its own work over the cluster; more
# jobs at once mostly start more worker processes: 8 small tasks took 19 s from a fresh local
# cluster on 2 cores 4 at a time, 11 s 2 at a time (and 12 s one at a time).
CONCURRENT_WRITES = 2
LENGTH_BUCKET = 8  # tokens: examples this close in length count as alike (see _chunker)
# With a token budget, a training chunk holds at most this many times chunk_size examples: what
# the budget does not count (decoder targets, per-example head work) stays bounded.
BUDGET_MAX_FACTOR = 8
CACHE_FORMAT = 8  # bump when the chunk rows change: older caches are then rebuilt
CACHE_DIR = ".chunk-cache"  # below the storage root: shared by every run stored there
DATA_RECORD = "data.json"  # in a run directory: the cache entries the run reads
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
    group_by_length: bool = True  # order each window's examples by length before chunking
    # batching.tokens_per_micro_batch: training chunks of up to this many padded tokens instead
    # of chunk_size examples (_by_budget). Out of the repr, and so of the fingerprint, when 0:
    # the caches made before it existed keep their keys.
    tokens_per_chunk: int = dataclasses.field(default=0, repr=False)

    @staticmethod
    def from_config(config: Config) -> ChunkSettings:
        model, batching = config.model, config.batching
        chunk_size = batching.micro_batch_size
        if batching.strategy == "mixed":  # a micro-batch is made of several smaller chunks
            chunk_size //= batching.tasks_per_micro_batch
        return ChunkSettings(
            Limits(model.max_length, model.max_target_length, model.doc_stride), chunk_size,
            batching.eval_batch_size, config.training.seed, config.training.max_eval_examples,
            config.tasks.data_seed, config.tasks.train_fraction, batching.group_by_length,
            batching.tokens_per_micro_batch)


@dataclass(frozen=True)
class CacheIndex:
    """Where the chunks of one task's split are: files in order, and in each the row groups
    that hold a chunk (one left empty by skipped rows holds none)."""

    directory: str  # URI
    files: tuple[tuple[str, tuple[int, ...]], ...]  # (file name, row groups with a chunk)
    examples: int
    skipped: int = 0  # bad rows left out (tasks.skip_bad_rows)
    cells: tuple[int, ...] = ()  # each chunk's padded tokens (rows x length): its cost

    @property
    def chunks(self) -> int:
        return sum(len(groups) for _, groups in self.files)

    @property
    def fingerprint(self) -> str:
        """What the chunks are made of (_fingerprint): the cache entry's name, whatever root or
        attempt (`<root>/<fingerprint>/<attempt>`) holds them."""
        return posixpath.basename(posixpath.dirname(self.directory.rstrip("/")))

    def locate(self, chunk: int) -> tuple[str, int]:
        for name, groups in self.files:
            if chunk < len(groups):
                return f"{self.directory}/{name}", groups[chunk]
            chunk -= len(groups)
        raise IndexError(f"chunk {chunk} beyond the end of {self.directory}")


# ------------------------------------------------------------------------------ stage 1


def _chunker(task: Task, split: str, shipped: Shipped, settings: ChunkSettings):
    """Ray Data map function: a window of rows (`CHUNKS_PER_BLOCK` chunks' worth) becomes its
    chunks. With `group_by_length`, the window's examples are ordered by length first, so that
    each chunk pads to little more than its own examples' lengths (the schedule draws chunks in
    a seeded random order, so training still sees tasks' examples in random order). Lengths
    count in buckets of LENGTH_BUCKET tokens, keeping the shuffled order within a bucket: where
    length goes with the label (a negation adds a word), exact sorting would fill chunks with
    one label. With a token budget (`tokens_per_chunk`), training chunks are cut by
    `_by_budget` instead; the window stays CHUNKS_PER_BLOCK x chunk_size rows."""
    size = settings.chunk_size if split == "train" else settings.eval_chunk_size
    budget = settings.tokens_per_chunk if split == "train" else 0

    def featurize(rows: list[dict[str, Any]]):
        examples = [task.source.decode(row, split) for row in rows]
        return task.task_type.featurize(task, examples, shipped.get(), settings.limits)

    def make_chunks(table: pa.Table) -> dict[str, list]:
        pad_id = shipped.get().pad_token_id
        rows, skipped = table.to_pylist(), [0] * -(-table.num_rows // size)
        try:
            features = featurize(rows)
        except DataError:
            if not task.skip_bad_rows:
                raise
            features = []
            for i, row in enumerate(rows):  # find the bad rows one by one, keep the rest
                try:
                    features += featurize([row])
                except DataError:
                    skipped[i // size] += 1  # (counted in the chunk the row fell in)
        if settings.group_by_length:  # (stable: shuffled order within a bucket)
            features.sort(key=lambda f: max(len(r) for r in f.rows) // LENGTH_BUCKET)
        out: dict[str, list] = {k: [] for k in ("num_examples", "num_tokens", "padded_tokens",
                                                "skipped", "payload")}
        if budget:  # (the window's bad rows counted in its first chunk)
            parts = _by_budget(features, budget, BUDGET_MAX_FACTOR * size) or [[]]
            skipped = [sum(skipped)] + [0] * (len(parts) - 1)
        else:
            parts = [features[i * size:(i + 1) * size] for i in range(len(skipped))]
        for part, bad in zip(parts, skipped):
            chunk = mb.collate(part, None, pad_id, keep_text=split != "train") if part else None
            out["num_examples"].append(len(part))
            out["num_tokens"].append(int(chunk["attention_mask"].sum()) if chunk else 0)
            out["padded_tokens"].append(int(chunk["attention_mask"].size) if chunk else 0)
            out["skipped"].append(bad)
            out["payload"].append(mb.to_bytes(chunk) if chunk else b"")
        return out

    return make_chunks


def _by_budget(features: list[Features], budget: int, most: int) -> list[list[Features]]:
    """`features` cut, in order, into runs of as many as fit `budget` padded tokens (their rows
    x their longest row, as `mb.collate` pads them), at least one and at most `most` each."""
    parts: list[list[Features]] = []
    start = rows = longest = 0
    for i, f in enumerate(features):
        length = max(len(r) for r in f.rows)
        if i > start and (i - start == most
                          or (rows + len(f.rows)) * max(longest, length) > budget):
            parts.append(features[start:i])
            start, rows, longest = i, 0, 0
        rows, longest = rows + len(f.rows), max(longest, length)
    if start < len(features):
        parts.append(features[start:])
    return parts


def _fingerprint(task: Task, split: str, content: str, vocab: str, settings: ChunkSettings
                 ) -> str:
    """Everything a task's chunks depend on: its spec, its data's content
    (`source.fingerprint`), the split, the tokenizer's vocabulary (`_vocabulary`) and the chunk
    settings. Equal fingerprints, equal chunks: runs share them."""
    if split != "train":  # (the training order and subset do not shape the other splits)
        settings = dataclasses.replace(settings, chunk_size=0, seed=0, train_fraction=1.0,
                                       tokens_per_chunk=0)
    key = repr((CACHE_FORMAT, task, task.source, content, split, vocab, settings))
    if settings.tokens_per_chunk:  # (not in the settings' repr: see ChunkSettings)
        key += f"/tokens_per_chunk={settings.tokens_per_chunk}"
    if task.noise:  # (nor a denoising task's noise in the task's)
        key += f"/noise={task.noise}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _vocabulary(tokenizer) -> str:
    return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def cache_root(storage: str) -> RunDir:
    """The chunk cache of every run under one storage root."""
    return RunDir(f"{storage.rstrip('/')}/{CACHE_DIR}")


def prepare(tasks: list[Task], cache: RunDir, tokenizer, settings: ChunkSettings,
            splits: tuple[str, ...] = ("train", "validation"),
            ) -> dict[str, dict[str, CacheIndex]]:
    """Every task's splits as chunks in the shared cache `cache`: found there when another run
    (or an earlier start of this one) made them, tokenized with Ray Data otherwise. If that
    fails, whatever this call wrote is removed again."""
    return prepare_each([(tasks, settings)], cache, tokenizer, splits)[0]


def prepare_each(requests: list[tuple[list[Task], ChunkSettings]], cache: RunDir, tokenizer,
                 splits: tuple[str, ...]) -> list[dict[str, dict[str, CacheIndex]]]:
    """`prepare` for several (tasks, settings) at once: what is missing of all of them is
    tokenized side by side (a protocol's seeds and fractions: one Ray Data job after another
    would leave the cluster mostly idle), each cache entry once."""
    vocab = _vocabulary(tokenizer)
    # (each file hashed once, however many seeds and fractions read it)
    contents = {(task.name, split): task.source.fingerprint(split)
                for tasks, _ in requests for task in tasks for split in splits}
    entries = [{(task.name, split): _fingerprint(task, split, contents[task.name, split], vocab,
                                                 settings)
                for task in tasks for split in splits} for tasks, settings in requests]
    pending = {}
    for (tasks, settings), entry in zip(requests, entries):
        for task in tasks:
            for split in splits:
                name = entry[task.name, split]
                if name not in pending and _read_index(cache, name) is None:
                    pending[name] = (task, split, name, settings)
    if pending:
        _write_chunks(list(pending.values()), cache, tokenizer)
    out = []
    for (tasks, _), entry in zip(requests, entries):
        caches: dict[str, dict[str, CacheIndex]] = {}
        for task in tasks:
            for split in splits:
                index = _read_index(cache, entry[task.name, split])
                if index.examples == 0:
                    raise DataError(f"task {task.name!r}: the {split} split has no examples")
                caches.setdefault(task.name, {})[split] = index
        out.append(caches)
    return out


def _write_chunks(pending, cache: RunDir, tokenizer) -> None:
    """One Ray Data job per task and split, a few at a time, each driven from its own Ray task
    (no CPU reserved: the job's own tasks do the work). A single job over the union of all of
    them deadlocked the streaming executor on few CPUs (many branches, all-to-all shuffles,
    preserved order); driving them from threads of one process raced in Ray's imports.

    Each job writes a fresh attempt directory below its entry and then the entry's index
    naming it, so runs that tokenize the same task at once never mix their files."""
    write = ray.remote(num_cpus=0, max_retries=0)(_write_split)
    shipped = Shipped(tokenizer)
    attempt = uuid.uuid4().hex[:12]
    waiting, running = list(pending), []
    try:
        while waiting or running:
            while waiting and len(running) < CONCURRENT_WRITES:
                task, split, entry, settings = waiting.pop(0)
                running.append(write.remote(task, split, cache.root, f"{entry}/{attempt}",
                                            shipped, settings))
            done, running = ray.wait(running, num_returns=1)
            ray.get(done)
    except Exception as e:  # a DataError raised inside a Ray task arrives wrapped
        # Killed, not interrupted: an interrupt that lands inside an import leaves the module
        # half-imported in a worker Ray goes on reusing, and every later task there fails
        # (fsspec, in CI). Its Ray Data job's tasks go too, a moment later (Ray ends what a dead
        # owner leased): a file one writes after the clean-up below is in no index, never read.
        for ref in running:
            ray.cancel(ref, force=True)
        # Wait until the cancelled writers are gone before removing what they wrote: a writer
        # still running would put files back (seen under load in CI).
        if running:
            ray.wait(running, num_returns=len(running), timeout=120)
        for _, _, entry, _ in pending:
            index = _read_index(cache, entry)
            if index is not None and index.directory.endswith(f"/{attempt}"):
                cache.remove(entry)  # complete, but made by the start that failed
            else:
                cache.remove(f"{entry}/{attempt}")
                if not cache.list(entry):
                    cache.remove(entry)
        if not cache.list(""):
            cache.remove()
        raise unwrap_data_error(e) from None


def _write_split(task: Task, split: str, cache_uri: str, directory: str, shipped: Shipped,
                 settings: ChunkSettings) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache = RunDir(cache_uri)
    size = settings.chunk_size if split == "train" else settings.eval_chunk_size
    ds = task.source.read(split)
    if split == "train" and settings.train_fraction < 1:
        ds = _subset(ds, settings.train_fraction, settings.seed)
    capped = split != "train" and settings.max_eval_examples is not None
    if not task.source.shuffled and (split == "train" or capped):
        # (a capped validation split is a random sample too: files are often sorted by label)
        seed = settings.seed if split == "train" else settings.data_seed
        ds = ds.random_shuffle(seed=seed * 1009 + zlib.crc32(task.name.encode()))
    if capped:
        ds = ds.limit(settings.max_eval_examples)
    # Windows of exactly CHUNKS_PER_BLOCK chunks in a fixed row order, so the same inputs always
    # give the same chunks (map_batches alone cuts batches wherever Ray happens to bundle
    # blocks).
    window = size * CHUNKS_PER_BLOCK
    ds = ds.repartition(target_num_rows_per_block=window, strict=True)
    ds = ds.map_batches(_chunker(task, split, shipped, settings), batch_size=window,
                        batch_format="pyarrow")
    ds.context.execution_options.preserve_order = True
    # Ray Data logs a failing job itself; bad data should read as one line on the driver (the
    # error still propagates; anything else keeps its traceback). Set after the dataset is
    # built: Ray Data configures its logger when it first needs it.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ds.write_parquet(cache.uri(directory), row_group_size=1)
    _write_index(cache, directory)


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


def _write_index(cache: RunDir, directory: str) -> None:
    """`<entry>/index.json`, naming the attempt `directory` (<entry>/<attempt>) and its files."""
    entry, attempt = directory.split("/")
    files, examples, skipped, cells = [], 0, 0, []
    for name in sorted(cache.list(directory)):
        if not name.endswith(".parquet"):
            continue
        with cache.open_input(f"{directory}/{name}") as f:
            counts = pq.ParquetFile(f).read(
                columns=["num_examples", "skipped", "padded_tokens"]).to_pydict()
        groups = [g for g, n in enumerate(counts["num_examples"]) if n]
        files.append((name, groups))
        cells += [counts["padded_tokens"][g] for g in groups]
        examples += sum(counts["num_examples"])
        skipped += sum(counts["skipped"])
    # Written last: an entry without its index is incomplete, and is made again.
    cache.write_text(f"{entry}/index.json", json.dumps(
        {"attempt": attempt, "files": files, "examples": examples, "skipped": skipped,
         "cells": cells}))


def _read_index(cache: RunDir, entry: str) -> CacheIndex | None:
    if not cache.exists(f"{entry}/index.json"):
        return None
    raw = json.loads(cache.read_text(f"{entry}/index.json"))
    files = tuple((name, tuple(groups)) for name, groups in raw["files"])
    return CacheIndex(cache.uri(f"{entry}/{raw['attempt']}"), files, raw["examples"],
                      raw["skipped"], tuple(raw["cells"]))


def write_run_caches(run_dir: RunDir, caches: dict[str, dict[str, CacheIndex]]) -> None:
    """Record in the run directory which cache entries the run reads (`data.json`)."""
    run_dir.write_text(DATA_RECORD, json.dumps(
        {task: {split: dataclasses.asdict(index) for split, index in splits.items()}
         for task, splits in caches.items()}, indent=1))


def check_unchanged(tasks: list[Task], recorded: dict[str, dict[str, CacheIndex]],
                    caches: dict[str, dict[str, CacheIndex]]) -> None:
    """A resumed run must read the data it started with: another content (or chunk settings)
    would mean other micro-batches behind the same schedule positions."""
    for task in tasks:
        for split, index in caches[task.name].items():
            before = recorded.get(task.name, {}).get(split)
            if before is not None and before.fingerprint != index.fingerprint:
                where = (task.source._path(split) if isinstance(task.source, FileSource)
                         else task.source.origin)
                raise DataError(f"task {task.name!r}: its {split} data ({where}) changed since "
                                "the run started; resuming would train on other examples than "
                                "its checkpoints did (restore the data, or start a new run.name)")


def read_run_caches(run_dir: RunDir) -> dict[str, dict[str, CacheIndex]]:
    raw = json.loads(run_dir.read_text(DATA_RECORD))
    return {task: {split: CacheIndex(index["directory"],
                                     tuple((n, tuple(g)) for n, g in index["files"]),
                                     index["examples"], index["skipped"],
                                     tuple(index["cells"]))
                   for split, index in splits.items()}
            for task, splits in raw.items()}


# ------------------------------------------------------------------------------ stage 2


class ChunkReader:
    """Reads chunks by index; keeps recently used Parquet files open (per process)."""

    _open: OrderedDict[str, pq.ParquetFile] = OrderedDict()
    MAX_OPEN = 256

    @classmethod
    def read(cls, cache: CacheIndex, chunk: int, task: int | None = None) -> mb.Batch:
        """A chunk as a batch of task `task`: the run's index of the task (chunks are shared
        between runs, which number their tasks differently); None: as cached, untagged."""
        batch = mb.from_bytes(cls.read_row(cache, chunk)["payload"])
        return batch if task is None else mb.for_task(batch, task)

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


def position_costs(schedule: Schedule, caches: list[CacheIndex]) -> np.ndarray:
    """Each schedule position's padded tokens: what its micro-batch costs to train on."""
    cells = [np.asarray(c.cells, dtype=np.int64) for c in caches]
    cost = np.zeros(len(schedule), dtype=np.int64)
    for t, task_cells in enumerate(cells):
        mine = schedule.task == t
        cost += np.where(mine, task_cells[np.where(mine, schedule.chunk, 0)], 0).sum(axis=1)
    return cost


def _fetcher(lookup_ref, caches: list[CacheIndex], pad_id: int, offset: int):
    """Ray Data map function: the micro-batches at the worker's (offset + i)-th positions."""

    def fetch(items: dict[str, np.ndarray]) -> dict[str, Any]:
        schedule, worker_positions = ray.get(lookup_ref)  # (in the object store, zero-copy)
        positions = worker_positions[items["id"] + offset]
        payloads, examples, tokens, padded = [], [], [], []
        for p in positions:
            rows = [ChunkReader.read_row(caches[t], c)
                    for t, c in zip(schedule.task[p], schedule.chunk[p])]
            # One micro-batch from its chunks (one, or several for `mixed`), tagged with the
            # run's task indices.
            batch = mb.merge([mb.for_task(mb.from_bytes(r["payload"]), t)
                              for r, t in zip(rows, schedule.task[p])], pad_id)
            payloads.append(mb.to_bytes(batch))
            examples.append(sum(r["num_examples"] for r in rows))
            tokens.append(sum(r["num_tokens"] for r in rows))
            padded.append(batch["attention_mask"].size)
        return {"position": positions, "task": schedule.task[positions],
                "chunk": schedule.chunk[positions], "epoch": schedule.epoch[positions],
                "num_examples": np.array(examples), "num_tokens": np.array(tokens),
                "padded_tokens": np.array(padded), "payload": np.array(payloads, dtype=object)}

    return fetch


def stream(schedule: Schedule, positions: np.ndarray, caches: list[CacheIndex], pad_id: int
           ) -> Iterator[dict[str, Any]]:
    """The micro-batches at `positions` (a worker's, Schedule.worker_positions), in that order,
    via Ray Data. Nothing per micro-batch is built up front: the pipeline counts and each fetch
    looks its chunks up in the schedule, which lives once in the object store.

    It runs as one Ray Data execution per segment (STREAM_SEGMENT micro-batches or
    STREAM_SEGMENT_TOKENS padded tokens), each produced at once and started when the one before
    it starts to be read. One execution for the whole run was held back by Ray Data's
    backpressure, and meanwhile its scheduling loop, a thread in this worker, spins without
    waiting (Ray 2.60 waits only on tasks in flight) and took the GIL from the training thread: a
    3,000-step CPU run trained at a fifth of its speed until the rest of its stream fitted under
    the budget. A segment is small, so it needs no backpressure and its execution ends once
    produced; two segments at most are in the object store."""
    if not len(positions):
        return iter(())
    lookup = ray.put((schedule, np.asarray(positions)))
    starts = _segment_starts(position_costs(schedule, caches)[positions])
    return _read_ahead(_segment(lookup, caches, pad_id, start, end)
                       for start, end in zip(starts, [*starts[1:], len(positions)]))


def _segment_starts(costs: np.ndarray) -> list[int]:
    starts, count, tokens = [0], 0, 0
    for i, cost in enumerate(costs.tolist()):
        if count and (count == STREAM_SEGMENT or tokens + cost > STREAM_SEGMENT_TOKENS):
            starts.append(i)
            count, tokens = 0, 0
        count, tokens = count + 1, tokens + cost
    return starts


def _segment(lookup, caches: list[CacheIndex], pad_id: int, start: int, end: int
             ) -> Iterator[dict[str, Any]]:
    """Positions [start, end) of the stream (its execution starts at the first row read).

    Its tasks hold no CPU: they mostly wait on storage, and a CPU of their own could be one the
    training workers already hold all of (`ray start --head` on a laptop declares as many CPUs
    as the workers take), where they would wait forever. The ids are made here, not read by a
    task (a read task would hold a CPU).

    They run on this worker's node where they can (Ray Data spreads small tasks over the
    cluster): its micro-batches then come from storage to the node that trains on them, not
    through another node, and the processes that fetch them (with their chunk caches) stay warm
    from one execution to the next."""
    ids = [{"id": i} for i in range(end - start)]
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    ds = ray.data.from_items(ids, override_num_blocks=-(-(end - start) // FETCH_BLOCK))
    ds = ds.map_batches(_fetcher(lookup, caches, pad_id, start), batch_size=FETCH_BLOCK,
                        batch_format="numpy", num_cpus=0, scheduling_strategy=here)
    ds.context.execution_options.preserve_order = True  # schedule order is the contract
    runtime.without_backpressure(ds.context)  # a segment is small: produce it at once
    yield from ds.iter_rows()


def _read_ahead(segments: Iterator[Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The rows of each segment in turn; each segment's first row is read in the background
    while the one before it is read, so its execution is under way when it is needed."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # (a line per finished execution)

    def begin(segment: Iterator[dict[str, Any]]):
        return segment, next(segment)

    with ThreadPoolExecutor(1, thread_name_prefix="stream-read-ahead") as pool:
        upcoming = pool.submit(begin, next(segments))
        for following in itertools.chain(segments, [None]):
            segment, first = upcoming.result()
            if following is not None:
                upcoming = pool.submit(begin, following)
            yield first
            yield from segment


def eval_chunks(caches: list[CacheIndex], rank: int, world_size: int,
                generating: list[bool]) -> list[tuple[int, int, bool, int]]:
    """This worker's share of the validation chunks of all tasks, as (task, chunk, counted,
    turn_cost): turn_cost is the largest padded size among the chunks dealt in the same turn,
    on which ZeRO-3 bases the number of passes every worker makes (train.py).

    Chunks are dealt out largest first in snake order (as Schedule.worker_positions does), so
    workers get even work, and each gets the same number of them (a short share repeats the
    cheapest chunk, not counted): all workers then run the same number of forward passes, which
    under ZeRO-3 are collectives. Chunks of generation tasks (`generating`), whose passes
    include generating, are dealt first as a group of their own, so that workers generate at
    the same calls.
    """
    plan = []
    for group in (True, False):
        items = sorted(((cache.cells[chunk] if cache.cells else 0, task, chunk)
                        for task, cache in enumerate(caches) if generating[task] == group
                        for chunk in range(cache.chunks)), key=lambda item: -item[0])
        if not items:
            continue
        items = [(task, chunk, True) for _, task, chunk in items]
        cheapest = items[-1]
        items += [(cheapest[0], cheapest[1], False)] * (-len(items) % world_size)
        cost = [caches[task].cells[chunk] if caches[task].cells else 0
                for task, chunk, _ in items]
        for turn, item in enumerate(items):
            lap, seat = divmod(turn, world_size)
            if (seat if lap % 2 == 0 else world_size - 1 - seat) == rank:
                plan.append((*item, max(cost[lap * world_size:(lap + 1) * world_size])))
    return plan
