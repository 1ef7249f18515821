"""The Ray Data stages on a real local cluster: the chunk cache, the stream, data errors."""

import json

import numpy as np
import pytest

from muppet_ray import batch as mb
from muppet_ray import data
from muppet_ray.config import BatchingConfig, MixtureConfig
from muppet_ray.errors import DataError
from muppet_ray.mixture import build_schedule
from muppet_ray.prefinetune import build_tokenizer, check
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import resolve_tasks
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
    index = run_dir.read_text("data/topic/train/index.json")
    before = payloads(caches["topic"]["train"])
    _, _, again = prepare(config, run_dir)
    assert run_dir.read_text("data/topic/train/index.json") == index
    assert again == caches
    changed = make_config(tmp_path, "tasks.include=[topic]", "tasks.data_seed=5")
    _, _, rebuilt = prepare(changed, run_dir)
    assert payloads(rebuilt["topic"]["train"]) != before


def test_stream_follows_the_schedule_and_resumes(ray_cluster, tmp_path):
    config = make_config(tmp_path, "tasks.include=[sentiment, needs, summarize]")
    tasks, tokenizer, caches = prepare(config, RunDir(str(tmp_path / "run")))
    train = [caches[t.name]["train"] for t in tasks]
    schedule = build_schedule([c.chunks for c in train], [c.examples for c in train],
                              MixtureConfig(), BatchingConfig(grad_accum_steps=2), 4, 20, 0)
    rows = list(data.stream(schedule, 1, 2, 0, train, tokenizer.pad_token_id))
    assert [r["position"] for r in rows] == list(schedule.worker_positions(1, 2))
    for row in rows[:10]:
        p = row["position"]
        chunk = data.ChunkReader.read(train[schedule.task[p, 0]], schedule.chunk[p, 0])
        assert mb.to_bytes(mb.from_bytes(row["payload"])) == mb.to_bytes(chunk)
    resumed = list(data.stream(schedule, 1, 2, 12, train, tokenizer.pad_token_id))
    assert [r["position"] for r in resumed] == [r["position"] for r in rows][12 * 2:]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def custom(tmp_path, rows, **fields):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, rows)
    spec = {"name": "mine", "type": "classification", "train": str(path),
            "labels": ["no", "yes"], **fields}
    return make_config(tmp_path, "tasks.include=[mine]", f"tasks.custom=[{json.dumps(spec)}]",
                       "model.pretrained=null")


GOOD = [{"sentence": f"row {i} says yes", "gold": "yes" if i % 2 else "no"} for i in range(40)]


def test_custom_jsonl_task(ray_cluster, tmp_path):
    config = custom(tmp_path, GOOD, fields={"text": "sentence", "label": "gold"})
    _, _, caches = prepare(config, RunDir(str(tmp_path / "run")))
    train, validation = caches["mine"]["train"], caches["mine"]["validation"]
    assert train.examples + validation.examples == 40 and validation.examples > 0


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
        check(config)
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
    for row in data.stream(schedule, 0, 1, 0, train, tokenizer.pad_token_id):
        batch = mb.from_bytes(row["payload"])
        p = row["position"]
        parts = [data.ChunkReader.read(train[t], c)
                 for t, c in zip(schedule.task[p], schedule.chunk[p])]
        assert row["num_examples"] == mb.num_examples(batch) == sum(map(mb.num_examples, parts))
        assert list(batch["example_task"]) == [t for part in parts for t in part["example_task"]]
        assert row["num_tokens"] == batch["attention_mask"].sum()
        mixed += len(set(batch["example_task"])) > 1
    assert mixed > 15  # most of the 30 micro-batches hold two tasks
