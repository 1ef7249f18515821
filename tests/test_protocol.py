"""The evaluation protocol's statistics (protocol.py): the learning rate is chosen on validation
only, and models are compared paired, with Student-t intervals over seeds."""

import math
import statistics

import pytest

from muppet_ray.protocol import Score, chosen, differences, interval


def score(model, task, seed, lr, validation, test, fraction=1.0):
    return Score(model, task, "accuracy", fraction, seed, lr, validation, test, 100, 10, "new")


def test_the_learning_rate_is_chosen_on_validation_never_on_test():
    # On task a, 1e-4 is best on test and on seed 0's validation, 3e-5 on the mean validation
    # over seeds: one rate for every seed, by the mean. On task b the other way round.
    scores = [score("m", "a", s, 1e-4, v, 0.9) for s, v in enumerate([0.9, 0.5, 0.5])]
    scores += [score("m", "a", s, 3e-5, v, 0.5) for s, v in enumerate([0.6, 0.7, 0.7])]
    scores += [score("m", "b", s, 1e-4, v, 0.5) for s, v in enumerate([0.6, 0.7, 0.7])]
    scores += [score("m", "b", s, 3e-5, v, 0.9) for s, v in enumerate([0.9, 0.5, 0.5])]
    picked = {(s.task, s.seed): s.learning_rate for s in chosen(scores)}
    assert picked == {**{("a", s): 3e-5 for s in range(3)}, **{("b", s): 1e-4 for s in range(3)}}


def test_interval_is_the_student_t_one():
    mean, half = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, df 4) = 2.7764
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert math.isnan(interval([1.0])[1])
    # past 20 degrees of freedom too (t(0.975, df 29) = 2.045, not the normal's 1.96)
    values = [float(i % 2) for i in range(30)]
    half = interval(values)[1]
    assert half == pytest.approx(2.045 * statistics.stdev(values) / math.sqrt(30), rel=1e-3)


def test_differences_are_paired_by_seed_and_averaged_over_tasks_per_seed():
    # Seeds differ a lot in level (a lucky subset), the model is always exactly 2 points
    # better on task a and 0 on task b: the paired interval is zero-width.
    scores = []
    for seed, level in enumerate([0.3, 0.6, 0.9]):
        scores += [score("base", "a", seed, 1e-4, 0, level), score("pf", "a", seed, 1e-4, 0,
                                                                   level + 0.02),
                   score("base", "b", seed, 1e-4, 0, level), score("pf", "b", seed, 1e-4, 0,
                                                                   level)]
    found = {(d.model, d.task): d for d in differences(scores, "base")}
    assert found["pf", "a"].mean == pytest.approx(2.0)
    assert found["pf", "a"].half_width == pytest.approx(0.0, abs=1e-9)
    assert found["pf", "b"].mean == pytest.approx(0.0)
    assert found["pf", "mean"].mean == pytest.approx(1.0) and found["pf", "mean"].seeds == 3
    assert found["pf", "mean"].significant and not found["pf", "b"].significant


@pytest.mark.parametrize("validation_file", [None, "valid.jsonl"])
def test_train_validation_and_test_split_the_rows_without_overlap(validation_file):
    from muppet_ray.sources import FileSource

    source = FileSource("t", "train.jsonl", validation_file, 0.2, "jsonl", test_fraction=0.25)
    bands = {split: source._band(split) for split in ("train", "validation", "test")}
    if validation_file:  # validation is its own file; test and train share the train file
        assert bands == {"validation": None, "test": (0.0, 0.25), "train": (0.25, 1.0)}
    else:
        assert bands == {"validation": (0.0, 0.2), "test": (0.2, 0.45), "train": (0.45, 1.0)}
    assert FileSource("t", "train.jsonl", None, 0.2, "jsonl")._band("train") == (0.2, 1.0)


def test_scores_are_keyed_by_the_head_each_run_starts_from():
    # A cached group of scores is reused only by runs that would repeat it: `protocol.head=new`
    # shares the plain model's scores and a fresh-headed task's, never a reused head's.
    from muppet_ray.config import to_yaml, validate
    from muppet_ray.data import CacheIndex
    from muppet_ray.finetune import finetune_config
    from muppet_ray.model_source import Source
    from muppet_ray.protocol import _group_key, eval_config
    from muppet_ray.tasks import resolve_tasks

    def key(source, task, head, on_gpu=False, precision="auto", storage="/runs", attempt="a",
            by_location=False):
        base = eval_config(validate({"protocol": {"head": head},
                                     "deepspeed": {"precision": precision},
                                     "run": {"storage_path": storage}}))
        configs = {1.0: finetune_config(base, source, task, 1.0, 0, f"{storage}/x", "-")}
        caches = {1.0: {split: CacheIndex(f"{storage}/.chunk-cache/{task}-{split}/{attempt}",
                                          (), 10) for split in ("train", "validation", "test")}}
        return _group_key(configs, source, resolve_tasks(configs[1.0])[0], caches, on_gpu,
                          by_location)

    plain = Source("plain", "/models/plain")
    trained = Source("run", "/models/run", {"config": to_yaml(validate({})), "tasks": [
        {"name": "needs", "type": "multiple_choice", "num_outputs": 0, "labels": []}]})
    assert key(plain, "who_has", "auto") == key(plain, "who_has", "new")
    assert key(trained, "review", "auto") == key(trained, "review", "new")  # no trained head
    assert key(trained, "who_has", "auto") != key(trained, "who_has", "new")  # the MC head
    assert key(trained, "who_has", "new") != key(plain, "who_has", "new")  # another encoder
    # ... and by where and in which precision they train: a GPU's bf16 scores are not a CPU's
    assert key(plain, "who_has", "new", on_gpu=True) != key(plain, "who_has", "new")
    assert key(plain, "who_has", "new", precision="bf16") != key(plain, "who_has", "new")
    assert key(plain, "who_has", "new", precision="fp32") == key(plain, "who_has", "new")
    # ... but not by where the tokenized data is cached (keyed by its fingerprint): a sweep
    # restored in another working directory finds its scores, and a model outside the storage
    # (the plain backbone) shares them across storage roots
    assert key(plain, "who_has", "new", storage="s3://b/runs", attempt="b") == key(
        plain, "who_has", "new")
    # Scores stored under the keys of before (which held the cache's location) are still found:
    # the same key as the code of 1f157be made for this group
    assert key(plain, "who_has", "new", by_location=True) == "0cd7c8cc5007d672dfda6593"


def test_scores_stored_under_the_key_of_before_are_found_and_kept_under_the_new_one(tmp_path):
    from muppet_ray.protocol import stored_scores
    from muppet_ray.storage import RunDir

    store = RunDir(str(tmp_path))
    assert stored_scores(store, "new", "old") is None
    store.write_text("old.json", "[1]")
    assert stored_scores(store, "new", "old") == "[1]"
    assert store.read_text("new.json") == "[1]"
    store.write_text("new.json", "[2]")  # the key's own come first
    assert stored_scores(store, "new", "old") == "[2]"
