"""The real task files of ../shared/data through the real readers (Ray Data), every task type
turned into features with the real MiniLM tokenizer. Set MUPPET_SHARED to use another copy."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muppet_ray.config import TaskSpec, load_config
from muppet_ray.errors import DataError
from muppet_ray.metrics import read_log
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import custom_task
from muppet_ray.tokenizer import load_tokenizer
from tests.conftest import ROOT

SHARED = os.environ.get("MUPPET_SHARED", str(ROOT.parent / "shared"))
DATA, MINILM = f"{SHARED}/data", f"{SHARED}/models/all-MiniLM-L6-v2"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no shared data at {DATA}"),
]
LIMITS = Limits(max_length=256, max_target_length=64)
CONFIG = load_config(None, [])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def task(**spec):
    return custom_task(TaskSpec(name=spec.pop("name", "t"), **spec), CONFIG)


def features_of(t, tokenizer, n=40):
    rows = t.source.sample("train", n)
    assert len(rows) == n
    return rows, t.task_type.featurize(t, rows, tokenizer, LIMITS)


def best_targets(path: str, rows) -> list[str]:
    """Each row's best-scored target, read from the BIG-bench file itself (`_row` counts its
    examples from 1)."""
    examples = json.loads(Path(path).read_text(encoding="utf-8"))["examples"]
    scores = [examples[r["_row"] - 1]["target_scores"] for r in rows]
    return [max(s, key=s.get) for s in scores]


def test_bigbench_classification(ray_cluster, tokenizer):
    path = f"{DATA}/bigbench/sports_understanding/task.json"
    t = task(format="bigbench", train=path)
    assert (t.type, t.labels) == ("classification", ("plausible", "implausible"))
    rows, features = features_of(t, tokenizer)
    assert [r["label"] for r in rows] == best_targets(path, rows)
    assert all(f.label == t.labels.index(r["label"]) for r, f in zip(rows, features))


def test_bigbench_multiple_choice(ray_cluster, tokenizer):
    path = f"{DATA}/bigbench/social_iqa/task.json"
    t = task(format="bigbench", train=path)
    assert t.type == "multiple_choice"
    rows, features = features_of(t, tokenizer)
    assert [r["choices"][r["label"]] for r in rows] == best_targets(path, rows)
    for row, f in zip(rows, features):
        assert len(f.rows) == len(row["choices"]) >= 2
        correct = tokenizer.decode(f.rows[f.label], skip_special_tokens=True)
        assert correct.endswith(row["choices"][row["label"]].lower().strip(" ."))


def test_bigbench_generation(ray_cluster, tokenizer):
    t = task(format="bigbench", train=f"{DATA}/bigbench/gem/xsum/task.json")
    assert t.type == "generation"
    rows, features = features_of(t, tokenizer, n=10)
    for row, f in zip(rows, features):
        decoded = tokenizer.decode(f.decoder_labels, skip_special_tokens=True).replace(" ", "")
        assert decoded[:30] == row["target"].lower().replace(" ", "")[:30]


def test_squad_spans_recover_the_answers(ray_cluster, tokenizer):
    t = task(format="squad", type="span", train=f"{DATA}/squad/squaddev_v1.1.json")
    rows = t.source.sample("train", 60)
    features = t.task_type.featurize(t, rows, tokenizer, Limits(128, 16, doc_stride=48))
    by_id = {r["_id"]: r for r in rows}
    assert len(features) > len(rows)  # long contexts became several windows
    answered, exact = set(), 0
    for f in features:
        if f.start == 0:  # the answer is not in this window
            continue
        row = by_id[f.example_id]
        answered.add(f.example_id)
        decoded = tokenizer.decode(f.rows[0][f.start:f.end + 1]).replace(" ", "")
        answer = row["answer"].lower().replace(" ", "")
        # whole tokens cover the answer ("8" inside "18" is labelled as "18"), and tightly
        assert answer in decoded and len(decoded) <= len(answer) + 4, (row["id"], decoded)
        exact += decoded == answer
        # and the token offsets give back the answer text itself
        text = f.context[f.offsets[f.start][0]:f.offsets[f.end][1]]
        assert row["answer"] in text and len(text) <= len(row["answer"]) + 4
    assert answered == set(by_id)  # every answer lies in at least one window
    assert exact > 0.9 * sum(f.start > 0 for f in features)


def test_csv_with_field_mapping(ray_cluster, tokenizer):
    spec = dict(format="csv", type="classification", train=f"{DATA}/tweets/sentiment.csv",
                fields={"text": "text", "label": "sentiment"},
                labels=["negative", "neutral", "positive"])
    # the file holds a few bytes that are not UTF-8: an error naming them, unless asked to replace
    with pytest.raises(DataError, match=r"sentiment.csv, line 2: not UTF-8 text \(byte 0xd1\)"):
        features_of(task(**spec), tokenizer)
    rows, features = features_of(task(**spec, decode_errors="replace"), tokenizer)
    assert {f.label for f in features} <= {0, 1, 2}
    assert all(r["_origin"].endswith("sentiment.csv") and r["_row"] >= 2 for r in rows)


def test_json_and_parquet_hold_the_same_rows(ray_cluster, tokenizer, tmp_path):
    with open(f"{DATA}/tweets/sentiment.csv", encoding="utf-8", errors="replace") as f:
        records = [{"tweet": r["text"], "mood": r["sentiment"], "meta": {"score": r["confidence"]}}
                   for _, r in zip(range(200), csv.DictReader(f))]
    (tmp_path / "t.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    labels = ["negative", "neutral", "positive"]
    fields = {"text": "tweet", "label": "mood", "text_pair": "meta.score"}
    seen = []
    for fmt in ("json", "parquet"):
        t = task(format=fmt, type="classification", train=str(tmp_path / f"t.{fmt}"),
                 fields=fields, labels=labels)
        train = t.source.read("train").take_all()
        validation = t.source.read("validation").take_all()
        assert len(train) + len(validation) == 200 and len(validation) > 5
        assert not {r["_row"] for r in train} & {r["_row"] for r in validation}
        decoded = sorted((r["_row"], t.source.decode(r, "train")["text_pair"])
                         for r in train + validation)
        seen.append(decoded)
    assert seen[0] == seen[1]
    assert seen[0][0][1] == records[seen[0][0][0] - 1]["meta"]["score"]


def test_the_held_out_rows_do_not_depend_on_where_the_data_lives(ray_cluster, tmp_path):
    held_out = []
    for place in ("here", "there/deeper"):
        (tmp_path / place).mkdir(parents=True)
        shutil.copy(f"{DATA}/tweets/sentiment.csv", tmp_path / place / "sentiment.csv")
        t = task(format="csv", type="classification", train=str(tmp_path / place),
                 fields={"text": "text", "label": "sentiment"},
                 labels=["negative", "neutral", "positive"], decode_errors="replace")
        rows = t.source.read("validation").take_all()
        held_out.append(sorted((r["_id"], r["_row"]) for r in rows))
    assert held_out[0] == held_out[1] and len(held_out[0]) > 10


def test_a_bad_label_names_file_and_row(ray_cluster, tokenizer, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentiment,text\npositive,good\nangry,bad\n")
    (tmp_path / "ok.csv").write_text("sentiment,text\nnegative,meh\n")
    t = task(format="csv", type="classification", train=str(path), labels=["negative", "positive"],
             fields={"text": "text", "label": "sentiment"}, validation=str(tmp_path / "ok.csv"))
    rows = t.source.sample("train", 2)
    with pytest.raises(DataError, match=rf"{path}, row 3: label 'angry' is not in the label"):
        t.task_type.featurize(t, rows, tokenizer, LIMITS)


def test_a_capped_validation_split_is_a_random_sample(ray_cluster, tmp_path):
    """sentiment.csv is sorted by label: its first rows would all be 'negative'."""
    from muppet_ray import data
    from muppet_ray.storage import RunDir

    t = task(name="tweets", format="csv", type="classification",
             train=f"{DATA}/tweets/sentiment.csv", fields={"text": "text", "label": "sentiment"},
             labels=["negative", "neutral", "positive"], decode_errors="replace")
    tokenizer = load_tokenizer(MINILM)
    # (a twentieth of the training rows: only the validation split is looked at)
    settings = data.ChunkSettings(LIMITS, 16, 64, seed=0, max_eval_examples=300,
                                  train_fraction=0.05)
    caches = data.prepare([t], RunDir(str(tmp_path / "run")), tokenizer, settings)
    validation = caches["tweets"]["validation"]
    labels = [int(label) for c in range(validation.chunks)
              for label in data.ChunkReader.read(validation, c)["label"]]
    assert len(labels) == 300
    assert all(labels.count(k) > 30 for k in range(3)), [labels.count(k) for k in range(3)]


def test_a_few_training_steps_on_real_data_of_every_type(ray_cluster, tmp_path, capsys):
    """Real rows of all four task types, and denoising of one's text, through the whole run: Ray
    Data, 2 Ray Train workers, DeepSpeed, evaluation (SQuAD F1 on text, ROUGE on generated text)
    and export."""
    from muppet_ray.prefinetune import prefinetune
    from tests.conftest import make_config

    specs = [
        {"name": "tweets", "type": "classification", "format": "csv",
         "train": f"{DATA}/tweets/sentiment.csv", "fields": {"text": "text", "label": "sentiment"},
         "labels": ["negative", "neutral", "positive"], "decode_errors": "replace"},
        {"name": "siqa", "format": "bigbench", "train": f"{DATA}/bigbench/social_iqa/task.json"},
        {"name": "squad", "type": "span", "format": "squad",
         "train": f"{DATA}/squad/squaddev_v1.1.json", "validation_fraction": 0.02},
        {"name": "xsum", "format": "bigbench", "train": f"{DATA}/bigbench/gem/xsum/task.json"},
        # self-supervised: the tweets' text column, its spans cut out (an encoder-decoder)
        {"name": "tweet_noise", "type": "denoising", "format": "csv",
         "train": f"{DATA}/tweets/sentiment.csv", "fields": {"text": "text"},
         "decode_errors": "replace"},
    ]
    # With a token budget (batching.tokens_per_micro_batch), as a mix of short and long real
    # examples is best run: micro-batches of as many examples as fit, not a fixed count.
    budget = 1024
    config = make_config(tmp_path, f"tasks.custom={json.dumps(specs)}",
                         "tasks.include=[tweets, siqa, squad, xsum, tweet_noise]",
                         "training.max_steps=3",
                         "training.max_eval_examples=24", "model.max_length=128",
                         "model.vocab_size=4000", "training.checkpoint_every=3",
                         f"batching.tokens_per_micro_batch={budget}",
                         "tasks.train_fraction=0.2")  # (3 steps: a fifth is plenty)
    result = prefinetune(config)
    metric = {"tweets": "accuracy", "siqa": "accuracy", "squad": "f1", "xsum": "rougeL",
              "tweet_noise": "accuracy"}
    for name, key in metric.items():
        assert 0.0 <= result.after[name][key] <= 1.0, (name, result.after[name])
    assert (tmp_path / "run" / "export" / "muppet.json").exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # (export, tokenizer: staged in place)
    # where the time went: worker 0's phases, and the driver's line that adds its own
    timed = [r for r in read_log(RunDir(result.run_dir)) if r["kind"] == "time"]
    assert sorted(timed[-1]["seconds"]) == ["checkpoints", "evaluation", "export", "start-up",
                                            "training"]
    assert all(v > 0 for v in timed[-1]["seconds"].values())
    line = next(x for x in capsys.readouterr().out.splitlines() if " s: starting Ray " in x)
    assert "tokenizing" in line and "training" in line and "other" in line

    from muppet_ray import data
    from tests.test_integration import schedule_of, train_records

    train, schedule = schedule_of(result, config)
    examples, drawn = np.zeros(len(train)), np.zeros(len(train))
    for t, c in zip(schedule.task[:, 0], schedule.chunk[:, 0]):
        row = data.ChunkReader.read_row(train[t], c)
        assert row["padded_tokens"] <= budget or row["num_examples"] == 1
        examples[t] += row["num_examples"]
        drawn[t] += 1
    # the short tweets fill their micro-batches with more than micro_batch_size examples
    tweets = [t.name for t in result.tasks].index("tweets")
    assert examples[tweets] / drawn[tweets] > config.batching.micro_batch_size
    positions = sorted(p for r in train_records(result.run_dir) for a, b in r["positions"]
                       for p in range(a, b))
    assert positions == list(range(len(schedule)))  # every scheduled micro-batch trained once
