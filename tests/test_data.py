"""The Ray Data stages on a real local cluster: the chunk cache, the stream, data errors."""

import dataclasses
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from muppet_ray import batch as mb
from muppet_ray import data
from muppet_ray.checkpoint import process_alive
from muppet_ray.config import BatchingConfig, Config, MixtureConfig
from muppet_ray.errors import DataError
from muppet_ray.mixture import build_schedule
from muppet_ray.prefinetune import build_tokenizer, resolve_and_check
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import resolve_tasks
from muppet_ray.tokenizer import Shipped
from tests.conftest import make_config

pytestmark = pytest.mark.integration
LIMITS = Limits(64, 16)


def prepare(config, run_dir):
    tasks = resolve_tasks(config)
    tokenizer = build_tokenizer(config, tasks)
    settings = data.ChunkSettings(LIMITS, 8, 32, config.training.seed)
    caches = data.prepare(tasks, run_dir, tokenizer, settings)
    return tasks, tokenizer, caches


def payloads(cache):
    return [mb.to_bytes(data.ChunkReader.read(cache, i)) for i in range(cache.chunks)]


def test_cache_is_deterministic_and_complete(ray_cluster, tmp_path):
    config = make_config(tmp_path, "tasks.include=[topic, needs, what_has]")
    tasks, _, first = prepare(config, RunDir(str(tmp_path / "a")))
    _, _, second = prepare(config, RunDir(str(tmp_path / "b")))
    for task in tasks:
        for split in ("train", "validation"):
            a, b = first[task.name][split], second[task.name][split]
            assert payloads(a) == payloads(b)
            ids = np.concatenate([data.ChunkReader.read(a, i)["example_id"]
                                  for i in range(a.chunks)])
            assert sorted(ids) == list(range(task.source.num_examples(split)))  # each once
            assert a.examples == len(ids)


def test_cache_is_reused_and_rebuilt_when_inputs_change(ray_cluster, tmp_path):
    config = make_config(tmp_path, "tasks.include=[topic]")
    run_dir = RunDir(str(tmp_path / "run"))
    _, _, caches = prepare(config, run_dir)
    def files():
        return sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))

    written = files()
    before = payloads(caches["topic"]["train"])
    _, _, again = prepare(config, run_dir)
    assert again == caches and files() == written  # found, nothing tokenized again
    changed = make_config(tmp_path, "tasks.include=[topic]", "tasks.data_seed=5")
    _, _, rebuilt = prepare(changed, run_dir)
    assert payloads(rebuilt["topic"]["train"]) != before


def test_stream_follows_the_schedule_and_resumes(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "STREAM_SEGMENT", 7)  # several Ray Data executions, chained
    config = make_config(tmp_path, "tasks.include=[sentiment, needs, summarize]")
    tasks, tokenizer, caches = prepare(config, RunDir(str(tmp_path / "run")))
    train = [caches[t.name]["train"] for t in tasks]
    schedule = build_schedule([c.chunks for c in train], [c.examples for c in train],
                              MixtureConfig(), BatchingConfig(grad_accum_steps=2), 4, 20, 0)
    cost = data.position_costs(schedule, train)
    mine = schedule.worker_positions(1, 2, cost=cost)
    rows = list(data.stream(schedule, mine, train, tokenizer.pad_token_id))
    assert [r["position"] for r in rows] == list(mine)
    for row in rows[:10]:
        p = row["position"]
        task = schedule.task[p, 0]
        chunk = data.ChunkReader.read(train[task], schedule.chunk[p, 0], task)
        assert mb.to_bytes(mb.from_bytes(row["payload"])) == mb.to_bytes(chunk)
    resumed = schedule.worker_positions(1, 2, start_step=12, cost=cost)
    assert list(resumed) == list(mine)[12 * 2:]
    rows = list(data.stream(schedule, resumed, train, tokenizer.pad_token_id))
    assert [r["position"] for r in rows] == list(resumed)


def test_stream_segments_bound_micro_batches_and_tokens(monkeypatch):
    monkeypatch.setattr(data, "STREAM_SEGMENT", 3)
    monkeypatch.setattr(data, "STREAM_SEGMENT_TOKENS", 100)
    costs = np.array([10, 10, 10, 10, 60, 50, 200, 1])
    # 3 micro-batches; 70 tokens (+50 is over); 50 (+200 is over); one over the bound alone; 1
    assert data._segment_starts(costs) == [0, 3, 5, 6, 7]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def custom(tmp_path, rows, **fields):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, rows)
    spec = {"name": "mine", "type": "classification", "train": str(path),
            "labels": ["no", "yes"], **fields}
    return make_config(tmp_path, "tasks.include=[mine]", f"tasks.custom=[{json.dumps(spec)}]",
                       "model.pretrained=null")


GOOD = [{"sentence": f"row {i} says {gold}", "gold": gold}
        for i, gold in enumerate(["no", "yes"] * 20)]


def test_custom_jsonl_task(ray_cluster, tmp_path):
    config = custom(tmp_path, GOOD, fields={"text": "sentence", "label": "gold"})
    _, tokenizer, caches = prepare(config, RunDir(str(tmp_path / "run")))
    train, validation = caches["mine"]["train"], caches["mine"]["validation"]
    assert train.examples + validation.examples == 40 and validation.examples > 0
    # each example is a row's sentence (its number aside: not in the trained vocabulary),
    # labelled with that row's gold label, which the sentence ends with
    for cache in (train, validation):
        for chunk in range(cache.chunks):
            batch = data.ChunkReader.read(cache, chunk)
            for ids, label in zip(batch["input_ids"], batch["label"]):
                words = tokenizer.decode(ids, skip_special_tokens=True).split()
                assert words[0] == "row" and words[-2:] == ["says", ["no", "yes"][label]], words


def test_train_validation_and_test_splits_share_no_row(ray_cluster, tmp_path):
    from muppet_ray.sources import FileSource

    write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}", "label": "no"} for i in range(200)])
    source = FileSource("t", str(tmp_path / "rows.jsonl"), None, 0.2, "jsonl", test_fraction=0.25)
    rows = {split: [r["_row"] for r in source.read(split).take_all()]
            for split in ("train", "validation", "test")}
    assert sum(map(len, rows.values())) == len(set().union(*rows.values())) == 200
    assert 20 <= len(rows["validation"]) <= 60 and 30 <= len(rows["test"]) <= 70


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"sentence": "a", "gold": "maybe"},
         r"label 'maybe' is not in the label space \['no', 'yes'\]"),
        ({"gold": "yes"}, "missing field 'text'"),
        ('{"sentence": "a", "gold": ', "not valid JSON"),
    ],
)
def test_data_errors_name_task_file_and_row(ray_cluster, tmp_path, bad_row, message):
    config = custom(tmp_path, [*GOOD[:5], bad_row, *GOOD[5:]],
                    fields={"text": "sentence", "label": "gold"}, validation_fraction=0.01)
    with pytest.raises(DataError, match=message) as info:
        prepare(config, RunDir(str(tmp_path / "run")))
    assert "mine.jsonl, row 6" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_data_error_kills_the_other_writers(ray_cluster, tmp_path):
    """The writers still running when one task's data fails are killed, not interrupted: an
    interrupt inside an import left a half-imported fsspec in a worker that Ray reused, and
    every later tokenizing there failed."""
    import os
    import time

    pid_file = tmp_path / "slow-writer.pid"

    class Source:  # a task's source; "slow": its train split takes ten minutes to read;
        # "after": reads once the slow one is reading (so that it is running when this fails)
        def __init__(self, inner, role):
            self.inner, self.role = inner, role

        def __getattr__(self, name):  # (not for these: unpickling asks before they are set)
            if name in ("inner", "role"):
                raise AttributeError(name)
            return getattr(self.inner, name)

        def read(self, split):
            if self.role == "slow" and split == "train":
                pid_file.write_text(str(os.getpid()))
                time.sleep(600)
            while self.role == "after" and not pid_file.exists():
                time.sleep(0.1)
            return self.inner.read(split)

    config = custom(tmp_path, [*GOOD[:5], {"sentence": "a", "gold": "maybe"}, *GOOD[5:]],
                    fields={"text": "sentence", "label": "gold"})
    [bad] = resolve_tasks(config)
    [topic] = resolve_tasks(make_config(tmp_path, "tasks.include=[topic]"))
    tasks = [dataclasses.replace(topic, source=Source(topic.source, "slow")),
             dataclasses.replace(bad, source=Source(bad.source, "after"))]
    # (2 writers at once: slow's splits start first, then bad's, which fail)
    settings = data.ChunkSettings(LIMITS, 8, 32, config.training.seed)
    run_dir = RunDir(str(tmp_path / "run"))
    began = time.monotonic()
    with pytest.raises(DataError, match="label 'maybe'"):
        data.prepare(tasks, run_dir, build_tokenizer(config, tasks), settings)
    assert time.monotonic() - began < 120  # the slow writer was not waited for
    pid = int(pid_file.read_text())
    for _ in range(100):  # a killed worker is gone within moments
        if not process_alive(pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the cancelled writer (pid {pid}) is still alive, for Ray to reuse")
    assert not (tmp_path / "run").exists()  # nothing of the failed start is left


def test_bad_rows_can_be_skipped_and_are_counted(ray_cluster, tmp_path):
    bad = [{"sentence": "a", "gold": "maybe"}, '{"sentence": ', {"gold": "yes"}]
    rows = GOOD[:8] + bad + GOOD[8:]
    config = custom(tmp_path, rows, fields={"text": "sentence", "label": "gold"},
                    validation_fraction=0.2)
    config.tasks.skip_bad_rows = True
    _, _, caches = prepare(config, RunDir(str(tmp_path / "run")))
    train, validation = caches["mine"]["train"], caches["mine"]["validation"]
    assert train.skipped + validation.skipped == 3
    assert train.examples + validation.examples == 40
    ids = [i for c in (train, validation) for k in range(c.chunks)
           for i in data.ChunkReader.read(c, k)["example_id"]]
    assert len(ids) == 40 and not {int(i) & 0xFFFFFFFF for i in ids} & {9, 10, 11}


def test_missing_file_and_empty_task(ray_cluster, tmp_path):
    config = custom(tmp_path, GOOD, fields={"text": "sentence", "label": "gold"})
    config.tasks.custom[0].train = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"task 'mine': file '.*nope.jsonl' does not exist"):
        resolve_and_check(config)
    empty = custom(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="task 'mine': the train split has no examples"):
        prepare(empty, RunDir(str(tmp_path / "run")))


def test_mixed_micro_batches_merge_chunks_of_several_tasks(ray_cluster, tmp_path):
    config = make_config(tmp_path, "tasks.include=[sentiment, needs, what_has]")
    tasks = resolve_tasks(config)
    tokenizer = build_tokenizer(config, tasks)
    caches = data.prepare(tasks, RunDir(str(tmp_path / "run")), tokenizer,
                          data.ChunkSettings(LIMITS, 4, 32, 0))
    train = [caches[t.name]["train"] for t in tasks]
    batching = BatchingConfig(strategy="mixed", micro_batch_size=8, tasks_per_micro_batch=2,
                              grad_accum_steps=1)
    schedule = build_schedule([c.chunks for c in train], [c.examples for c in train],
                              MixtureConfig(rule="uniform"), batching, 1, 30, 0)
    mixed = 0
    for row in data.stream(schedule, schedule.worker_positions(0, 1), train,
                           tokenizer.pad_token_id):
        batch = mb.from_bytes(row["payload"])
        p = row["position"]
        parts = [data.ChunkReader.read(train[t], c, t)
                 for t, c in zip(schedule.task[p], schedule.chunk[p])]
        assert row["num_examples"] == mb.num_examples(batch) == sum(map(mb.num_examples, parts))
        assert list(batch["example_task"]) == [t for part in parts for t in part["example_task"]]
        assert row["num_tokens"] == batch["attention_mask"].sum()
        mixed += len(set(batch["example_task"])) > 1
    assert mixed > 15  # most of the 30 micro-batches hold two tasks


def test_runs_share_the_cache_and_changed_data_is_tokenized_anew(ray_cluster, tmp_path):
    cache = RunDir(str(tmp_path / "cache"))
    alone = make_config(tmp_path, "tasks.include=[topic]")
    _, _, first = prepare(alone, cache)
    # another run, its tasks in another order: topic's chunks are found, not made again
    both = make_config(tmp_path, "tasks.include=[needs, topic]")
    _, _, second = prepare(both, cache)
    assert second["topic"] == first["topic"]
    # chunks carry no task index: a run tags them with its own
    assert set(data.ChunkReader.read(second["topic"]["train"], 0, 1)["example_task"]) == {1}

    config = custom(tmp_path, GOOD, fields={"text": "sentence", "label": "gold"})
    _, _, before = prepare(config, cache)
    write_jsonl(tmp_path / "mine.jsonl", [*GOOD[:-1], {"sentence": "changed", "gold": "no"}])
    _, _, after = prepare(config, cache)  # same path, other content
    assert after["mine"]["train"].directory != before["mine"]["train"].directory


def test_examples_of_similar_length_share_a_chunk(ray_cluster, tmp_path):
    def padding_efficiency(grouped):
        config = make_config(tmp_path, "tasks.include=[entailment, what_has]",
                             f"batching.group_by_length={str(grouped).lower()}")
        tasks = resolve_tasks(config)
        settings = data.ChunkSettings.from_config(config)
        caches = data.prepare(tasks, RunDir(str(tmp_path / "cache")),
                              build_tokenizer(config, tasks), settings, ("train",))
        real = padded = 0
        for task in tasks:
            cache = caches[task.name]["train"]
            for i in range(cache.chunks):
                row = data.ChunkReader.read_row(cache, i)
                real, padded = real + row["num_tokens"], padded + row["padded_tokens"]
            assert sum(cache.cells) == sum(data.ChunkReader.read_row(cache, i)["padded_tokens"]
                                           for i in range(cache.chunks))
        return real / padded

    shuffled, grouped = padding_efficiency(False), padding_efficiency(True)
    assert grouped > 0.95 and grouped > shuffled + 0.05, (shuffled, grouped)


def test_workers_share_validation_chunks_evenly():
    def cache(cells):
        return data.CacheIndex("unused", (("f", tuple(range(len(cells)))),), len(cells) * 4, 0,
                               tuple(cells))

    caches = [cache([5, 5, 1]), cache([40]), cache([3, 3]), cache([9, 2])]
    generating = [False, False, True, False]
    for world in (1, 2, 3, 4):
        plans = [data.eval_chunks(caches, rank, world, generating) for rank in range(world)]
        assert len({len(p) for p in plans}) == 1  # the same number of forward passes each
        counted = sorted((t, c) for p in plans for t, c, counted, _ in p if counted)
        assert counted == [(t, c) for t, x in enumerate(caches) for c in range(x.chunks)]
        for plan in plans:  # generation first, at the same calls on every worker
            assert [generating[t] for t, _, _, _ in plan[:1]] == [True]
        # every worker sees the same cost at the same call (ZeRO-3 bases its passes on it),
        # the largest of the chunks dealt at that call
        for calls in zip(*plans):
            assert len({cost for *_, cost in calls}) == 1
            assert calls[0][3] == max(caches[t].cells[c] for t, c, _, _ in calls)
    two = [data.eval_chunks(caches, rank, 2, generating) for rank in range(2)]
    work = [sum(caches[t].cells[c] for t, c, _, _ in plan) for plan in two]
    # Task by task (as before), both workers would run the 40-token chunk (one of them
    # uncounted) and the busier would do 58.
    assert max(work) <= 50
    four = [data.eval_chunks(caches, rank, 4, generating) for rank in range(4)]
    fillers = [(t, c) for plan in four for t, c, counted, _ in plan if not counted]
    assert sorted(fillers) == [(0, 2), (0, 2), (2, 1), (2, 1)]  # each group's cheapest


def window(name, tokenizer, split="train", budget=0):
    """One window (64 chunks' worth) of a built-in task's rows through the chunker (no Ray)."""
    from tests.test_task_types import task

    settings = data.ChunkSettings(LIMITS, 8, 32, 0, tokens_per_chunk=budget)
    rows = pa.table({"_id": list(range(8 * data.CHUNKS_PER_BLOCK))})
    return data._chunker(task(name), split, Shipped(tokenizer), settings)(rows)


def test_a_shipped_tokenizer_is_deserialized_once_in_each_process():
    from tests.test_task_types import suite_tokenizer

    tokenizer = suite_tokenizer()
    # (what a Ray task receives: the pickle of a Shipped, here twice as two tasks would)
    first, second = (pickle.loads(pickle.dumps(Shipped(tokenizer))) for _ in range(2))
    assert first.get() is second.get()  # the second task finds the first's
    assert first.get()("a b c").input_ids == tokenizer("a b c").input_ids


def example_ids(chunks):
    return sorted(i for p in chunks["payload"] for i in mb.from_bytes(p)["example_id"])


def test_a_token_budget_fills_training_chunks_and_leaves_validation_alone():
    from tests.test_task_types import suite_tokenizer

    tokenizer, budget = suite_tokenizer(), 256
    mean = {}
    for name in ("sentiment", "summarize", "what_has", "needs", "next_number"):
        off, on = window(name, tokenizer), window(name, tokenizer, budget=budget)
        assert set(off["num_examples"]) == {8}  # off: micro_batch_size examples each, as before
        for examples, cells, payload in zip(on["num_examples"], on["padded_tokens"],
                                            on["payload"]):
            # within the budget (rows x longest row; a choice is a row) unless alone, at most
            # 8 x micro_batch_size examples
            assert 1 <= examples <= data.BUDGET_MAX_FACTOR * 8
            assert cells <= budget or examples == 1
            assert cells == mb.from_bytes(payload)["attention_mask"].size
        assert example_ids(on) == example_ids(off)  # every example once
        mean[name] = np.mean(on["num_examples"])
        # validation chunks are never cut by the budget
        assert window(name, tokenizer, "validation", budget) == window(name, tokenizer,
                                                                        "validation")
    # short examples fill the budget with more of them; multiple choice (4 rows an example)
    # with fewer
    assert mean["sentiment"] > 2 * 8 and mean["sentiment"] > 3 * mean["needs"]


def test_the_token_budget_is_in_the_training_fingerprint_only():
    from tests.test_task_types import task

    off = data.ChunkSettings(LIMITS, 8, 32, 0)
    on = data.ChunkSettings(LIMITS, 8, 32, 0, tokens_per_chunk=512)
    assert "tokens_per_chunk" not in repr(off)  # off: the cache keys from before it existed
    t = task("sentiment")

    def key(split, settings):
        return data._fingerprint(t, split, "content", "vocab", settings)

    assert key("train", on) != key("train", off)
    assert key("train", on) != key("train", dataclasses.replace(on, tokens_per_chunk=1024))
    assert key("validation", on) == key("validation", off)
    assert data.ChunkSettings.from_config(
        Config().replace({"batching.tokens_per_micro_batch": 512})).tokens_per_chunk == 512


def test_with_a_token_budget_each_tasks_examples_follow_the_mixture(ray_cluster, tmp_path):
    config = make_config(tmp_path, "tasks.include=[sentiment, needs, what_has]")
    tasks = resolve_tasks(config)
    settings = data.ChunkSettings(LIMITS, 8, 32, 0, tokens_per_chunk=256)
    caches = data.prepare(tasks, RunDir(str(tmp_path / "run")), build_tokenizer(config, tasks),
                          settings, ("train",))
    train = [caches[t.name]["train"] for t in tasks]
    per_chunk = [[data.ChunkReader.read_row(c, i)["num_examples"] for i in range(c.chunks)]
                 for c in train]
    assert np.mean(per_chunk[0]) > 2 * np.mean(per_chunk[1])  # sentiment's fuller than needs'
    weights = np.array([c.examples for c in train]) / sum(c.examples for c in train)
    for budget in (256, 0):
        batching = BatchingConfig(grad_accum_steps=2, tokens_per_micro_batch=budget)
        schedule = build_schedule([c.chunks for c in train], [c.examples for c in train],
                                  MixtureConfig(), batching, 4, 500, 0)
        drawn = np.zeros(len(train))
        for t, c in zip(schedule.task[:, 0], schedule.chunk[:, 0]):
            drawn[t] += per_chunk[t][c]
        error = np.abs(drawn / drawn.sum() - weights).max()
        if budget:
            assert error < 0.01, (drawn / drawn.sum(), weights)
        else:  # (chunks drawn by the weights: sentiment's fuller ones over-sample it)
            assert error > 0.05, (drawn / drawn.sum(), weights)
