"""The catalog is data: validated without network, listed by the CLI, and readable from a local
mirror laid out as the Hub lays out its Parquet conversion."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muppet_ray import cli, suite
from muppet_ray.catalog import catalog, families
from muppet_ray.config import load_config
from muppet_ray.task_types import TASK_TYPES, Limits
from muppet_ray.tasks import resolve_tasks
from muppet_ray.tokenizer import texts_of, train_tokenizer


def test_every_entry_is_consistent():
    entries = catalog()
    assert len(entries) >= 45
    assert not set(entries) & set(suite.SUITE)
    kinds = {e.spec.type for e in entries.values()}
    assert kinds == {"classification", "regression", "multiple_choice", "span", "generation"}
    for name, entry in entries.items():
        spec, task_type = entry.spec, TASK_TYPES[entry.spec.type]
        assert spec.format == "hub" and spec.hub.count("/") == 1, name
        assert set(spec.fields) <= set(task_type.required_fields + task_type.optional_fields), name
        assert entry.families and (entry.size is None or entry.size > 0), name
        if spec.type == "classification":
            assert len(set(spec.labels)) == len(spec.labels) >= 2, name
        if spec.type == "multiple_choice" and spec.label_map:
            assert all(isinstance(v, int) and v >= 0 for v in spec.label_map.values()), name
        if spec.type == "span":
            assert {"answer", "answer_start"} <= set(spec.fields), name
        if spec.type == "generation":
            assert {"source", "target"} <= set(spec.fields), name
    assert {"glue", "superglue", "nli", "commonsense", "reading", "summarization"} <= set(
        families())
    assert sum(e.size or 0 for e in entries.values()) > 4_000_000


def test_families_expand_in_include():
    config = load_config(None, ["tasks.include=[glue, squad]", "model.arch=roberta"])
    names = [t.name for t in resolve_tasks(config)]
    assert names == families()["glue"] + ["squad"]
    assert resolve_tasks(config)[0].source.train == "hf://datasets/nyu-mll/glue@~parquet/cola/train"


def test_tasks_list_command(capsys):
    assert cli.main(["tasks", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in catalog())
    assert cli.main(["tasks", "list", "--family", "poetry"]) == 2
    assert "unknown family 'poetry'" in capsys.readouterr().err


def write_split(mirror, dataset, config, split, rows):
    directory = mirror / dataset / config / split
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "0000.parquet")


@pytest.mark.integration
def test_hub_reader_on_a_local_mirror(ray_cluster, tmp_path):
    mirror = tmp_path / "mirror"
    for split, n in (("train", 30), ("validation", 8)):
        write_split(mirror, "nyu-mll/glue", "sst2", split,
                    [{"sentence": f"a {'fine' if i % 2 else 'dull'} film", "label": i % 2,
                      "idx": i} for i in range(n)])
        write_split(mirror, "tau/commonsense_qa", "default", split, [
            {"id": str(i), "question": f"where is thing {i} ?", "question_concept": "thing",
             "choices": {"label": list("ABCDE"), "text": ["box", "bag", "sea", "car", "sky"]},
             "answerKey": "ABCDE"[i % 5]} for i in range(n)])
        write_split(mirror, "rajpurkar/squad", "plain_text", split, [
            {"id": str(i), "title": "t", "context": f"bob has {i} red kites .",
             "question": "what does bob have ?",
             "answers": {"text": [f"{i} red kites"], "answer_start": [8]}} for i in range(n)])
    config = load_config(None, ["tasks.include=[sst2, commonsense_qa, squad]",
                                f"tasks.hub_mirror={mirror}", "model.arch=roberta"])
    tasks = resolve_tasks(config)
    samples = {t.name: t.source.sample("train", 30) for t in tasks}
    tokenizer = train_tokenizer(texts_of(r for rows in samples.values() for r in rows), 200, 64)
    for task in tasks:
        rows = samples[task.name]
        assert len(rows) == 30 and rows[0]["_origin"].endswith("0000.parquet")
        features = task.task_type.featurize(task, rows, tokenizer, Limits(64, 8))
        if task.name == "sst2":
            assert [f.label for f in features] == [r["label"] for r in rows]
        if task.name == "commonsense_qa":  # answer letters became choice indices
            assert [f.label for f in features] == ["ABCDE".index(r["answerKey"]) for r in rows]
            assert {len(f.rows) for f in features} == {5}
        if task.name == "squad":
            for f, r in zip(features, rows):
                assert tokenizer.decode(f.rows[0][f.start:f.end + 1]) == r["answer"]
                assert f.answers == [r["answer"]]
        assert len(task.source.sample("validation", 10)) == 8
