"""Per task type: features, head shapes, loss-scaling values and metrics (no Ray)."""

import copy
import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from muppet_ray import suite
from muppet_ray.batch import collate, from_bytes, merge, to_bytes, to_torch
from muppet_ray.config import ModelConfig
from muppet_ray.errors import DataError
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.sources import BuiltinSource
from muppet_ray.task_types import TASK_TYPES, Limits
from muppet_ray.task_types.span import ANSWER_SEPARATOR, squad_scores
from muppet_ray.tasks import Task
from muppet_ray.tokenizer import texts_of, train_tokenizer

LIMITS = Limits(max_length=64, max_target_length=16)


def suite_tokenizer():
    samples = (suite.example(t, "train", i, 0) for t in suite.SUITE for i in range(200))
    return train_tokenizer(texts_of(samples), 500, 64)


@pytest.fixture(scope="module")
def tokenizer():
    return suite_tokenizer()


def task(name):
    spec = suite.SUITE[name]
    return Task(name, spec.type, BuiltinSource(name, 0, 1.0), spec.labels)


def featurize(name, tokenizer, n=4):
    t = task(name)
    return t.task_type.featurize(t, t.source.sample("train", n), tokenizer, LIMITS)


def test_classification_features(tokenizer):
    features = featurize("entailment", tokenizer)
    rows = task("entailment").source.sample("train", 4)
    for f, row in zip(features, rows):
        assert len(f.rows) == 1
        assert f.label == suite.SUITE["entailment"].labels.index(row["label"])
        text = tokenizer.decode(f.rows[0], skip_special_tokens=True)
        assert text == f"{row['text']} {row['text_pair']}"


def test_multiple_choice_features_vary_in_choices(tokenizer):
    features = featurize("next_number", tokenizer, n=30)
    rows = task("next_number").source.sample("train", 30)
    assert {len(f.rows) for f in features} == {3, 4, 5}
    for f, row in zip(features, rows):
        assert len(f.rows) == len(row["choices"])
        correct = tokenizer.decode(f.rows[f.label], skip_special_tokens=True)
        assert correct.endswith(row["choices"][row["label"]])


def test_span_features_recover_the_answer(tokenizer):
    features = featurize("what_has", tokenizer, n=20)
    rows = task("what_has").source.sample("train", 20)
    for f, row in zip(features, rows):
        answer = tokenizer.decode(f.rows[0][f.start:f.end + 1])
        assert answer == row["answer"]
        assert f.context_start <= f.start <= f.end <= f.context_end


def test_generation_features(tokenizer):
    features = featurize("summarize", tokenizer)
    rows = task("summarize").source.sample("train", 4)
    for f, row in zip(features, rows):
        assert tokenizer.decode(f.decoder_labels, skip_special_tokens=True) == row["target"]


def test_bad_rows_name_task_origin_and_row(tokenizer):
    t = task("topic")
    rows = t.source.sample("train", 3)
    rows[1]["label"] = "politics"
    with pytest.raises(DataError, match=r"task 'topic', built-in suite, row 1: label 'politics' "
                                        r"is not in the label space"):
        t.task_type.featurize(t, rows, tokenizer, LIMITS)
    del rows[1]["text"]
    with pytest.raises(DataError, match="row 1: missing field 'text'"):
        t.task_type.featurize(t, rows, tokenizer, LIMITS)
    m = task("needs")
    rows = m.source.sample("train", 2)
    rows[0]["label"] = 7
    with pytest.raises(DataError, match="label 7 is outside the 4 choices"):
        m.task_type.featurize(m, rows, tokenizer, LIMITS)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    specs = [task(n).layout() for n in suite.SUITE]
    config = ModelConfig(hidden_size=32, ffn_size=64, num_heads=4, max_length=64)
    return MuppetModel(build_backbone(config, tokenizer), specs, dropout=0.0, tokenizer=tokenizer)


def batch_of(name, tokenizer, n=6):
    index = list(suite.SUITE).index(name)
    return collate(featurize(name, tokenizer, n), index, tokenizer.pad_token_id)


def test_head_shapes(model, tokenizer):
    b = model.prepare(to_torch(batch_of("next_number", tokenizer), "cpu"))
    out = model.head_outputs(b, model.encode(b))
    rows, length = b["input_ids"].shape
    examples = len(b["example_task"])
    width = max(len(s.labels) for s in suite.SUITE.values())
    assert out["class_logits"].shape == (examples, width)
    assert out["choice_scores"].shape == (rows,)
    assert out["span_logits"].shape == (examples, length, 2)
    assert out["lm_logits"].shape[:2] == (examples, b["decoder_labels"].shape[1])
    # only the task's own labels can be predicted
    sentiment = model.prepare(to_torch(batch_of("sentiment", tokenizer), "cpu"))
    logits = model.head_outputs(sentiment, model.encode(sentiment))["class_logits"]
    assert (logits[:, 2:] <= -1e3).all() and (logits[:, :2] > -1e3).all()


@pytest.mark.parametrize("name", list(suite.SUITE))
def test_every_parameter_gets_a_gradient_whatever_the_task(model, tokenizer, name):
    """What keeps DeepSpeed's collectives in step: the same parameters on every micro-step."""
    model.zero_grad()
    model(to_torch(batch_of(name, tokenizer), "cpu"))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_loss_scaling_divides_by_log_n(model, tokenizer):
    """With uniform predictions every classification / choice loss equals log(n), so the
    scaled loss is 1 whatever n is (the point of the scaling)."""
    for name in ("sentiment", "topic", "entailment", "needs", "next_number"):
        b = model.prepare(to_torch(batch_of(name, tokenizer), "cpu"))
        out = model.head_outputs(b, model.encode(b))
        out["class_logits"] = torch.where(out["class_logits"] > -1e3, 0.0, -1e4)
        out["choice_scores"] = torch.zeros_like(out["choice_scores"])
        task_type = TASK_TYPES[suite.SUITE[name].type]
        mine = torch.ones(len(b["example_task"]), dtype=torch.bool)
        loss, log_n = task_type.loss(out, b, mine)
        assert torch.allclose(loss / log_n, torch.ones_like(loss), atol=1e-5), name
    # generation: log of the vocabulary; span: log of the number of real tokens
    b = model.prepare(to_torch(batch_of("summarize", tokenizer), "cpu"))
    out = model.head_outputs(b, model.encode(b))
    _, log_n = TASK_TYPES["generation"].loss(out, b, torch.ones(6, dtype=torch.bool))
    assert torch.allclose(log_n, torch.full_like(log_n, math.log(len(tokenizer))))
    b = model.prepare(to_torch(batch_of("what_has", tokenizer), "cpu"))
    out = model.head_outputs(b, model.encode(b))
    _, log_n = TASK_TYPES["span"].loss(out, b, torch.ones(6, dtype=torch.bool))
    assert torch.allclose(log_n, b["attention_mask"].sum(-1).float().log())
    # regression is unscaled
    b = model.prepare(to_torch(batch_of("rating", tokenizer), "cpu"))
    out = model.head_outputs(b, model.encode(b))
    _, log_n = TASK_TYPES["regression"].loss(out, b, torch.ones(6, dtype=torch.bool))
    assert torch.equal(log_n, torch.ones_like(log_n))


def test_loss_scaling_switch(model, tokenizer):
    b = to_torch(batch_of("topic", tokenizer), "cpu")
    model.eval()
    scaled = model(b)["loss"].item()
    model.loss_scaling = False
    try:
        unscaled = model(b)["loss"].item()
    finally:
        model.loss_scaling = True
        model.train()
    assert unscaled == pytest.approx(scaled * math.log(4), rel=1e-5)


def test_mixed_micro_batch_equals_its_parts(model, tokenizer):
    """A micro-batch of several tasks gives each example the loss it gets alone."""
    parts = [batch_of(n, tokenizer, 3) for n in ("sentiment", "needs", "what_has", "summarize")]
    model.eval()
    alone = [model(to_torch(p, "cpu"))["task_loss_sum"] for p in parts]
    together = model(to_torch(merge(parts, tokenizer.pad_token_id), "cpu"))["task_loss_sum"]
    model.train()
    assert torch.allclose(sum(alone), together, atol=1e-4)


def test_batch_round_trip(tokenizer):
    b = batch_of("needs", tokenizer)
    back = from_bytes(to_bytes(b))
    assert b.keys() == back.keys() and all(np.array_equal(b[k], back[k]) for k in b)


def test_metrics():
    classification = TASK_TYPES["classification"]
    out = {"class_logits": torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])}
    batch = {"label": torch.tensor([0, 0, 0]), "num_outputs": torch.tensor([2, 2, 2])}
    stats = classification.stats(out, batch, None).sum(0).numpy()
    assert classification.finalize(stats) == pytest.approx({"accuracy": 2 / 3, "chance": 0.5})

    regression = TASK_TYPES["regression"]
    x = torch.tensor([0.1, 0.4, 0.2, 0.9])
    y = torch.tensor([0.0, 0.5, 0.25, 1.0])
    stats = regression.stats({"class_logits": x[:, None]}, {"target": y}, None).sum(0)
    assert regression.finalize(stats.numpy())["pearson"] == pytest.approx(
        np.corrcoef(x, y)[0, 1], abs=1e-5)
    # Spearman: the rank correlation, from every pair (1: same order; 0.8: one pair swapped)
    mine = torch.ones(4, dtype=torch.bool)
    pairs = regression.pairs({"class_logits": x[:, None]}, {"target": y}, mine).numpy()
    assert regression.finalize(stats.numpy(), pairs)["spearman"] == pytest.approx(1.0)
    swapped = torch.tensor([0.0, 0.25, 0.5, 1.0])
    pairs = regression.pairs({"class_logits": x[:, None]}, {"target": swapped}, mine).numpy()
    assert regression.finalize(stats.numpy(), pairs)["spearman"] == pytest.approx(0.8)


def test_summarization_is_scored_by_rouge_score_with_stemming():
    generation = TASK_TYPES["generation"]

    class Tokenizer:
        @staticmethod
        def batch_decode(texts, skip_special_tokens):
            return texts

    out = {"generated": ["the cats were running home", "x"], "tokenizer": Tokenizer}
    batch = {"answers": ["The cat ran home", "y"]}
    mine = torch.tensor([True, False])  # (the caller keeps its own examples' rows)
    stats = generation.stats(out, batch, mine)[mine].sum(0).numpy()
    scores = generation.finalize(stats)
    # stemmed: cats -> cat; unigrams the, cat, home of 5 and 4 words; bigram "the cat" of 4, 3
    assert scores["rouge1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert scores["rouge2"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert scores["rougeL"] == pytest.approx(scores["rouge1"])  # the, cat, home in order


def test_multiple_choice_loss_is_cross_entropy_over_each_examples_choices():
    mc = TASK_TYPES["multiple_choice"]
    scores = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0])  # example 0: 3 choices, example 1: 2
    batch = {"row_example": torch.tensor([0, 0, 0, 1, 1]), "label": torch.tensor([2, 1]),
             "first_row": torch.tensor([0, 3])}
    mine = torch.tensor([True, True])
    loss, log_n = mc.loss({"choice_scores": scores}, batch, mine)
    expected = [torch.nn.functional.cross_entropy(scores[:3][None], torch.tensor([2])),
                torch.nn.functional.cross_entropy(scores[3:][None], torch.tensor([1]))]
    assert torch.allclose(loss, torch.stack(expected))
    assert torch.allclose(log_n, torch.tensor([math.log(3), math.log(2)]))
    stats = mc.stats({"choice_scores": scores}, batch, mine).sum(0).numpy()
    assert mc.finalize(stats) == pytest.approx({"accuracy": 0.5, "chance": (1 / 3 + 1 / 2) / 2})


@pytest.mark.parametrize(
    ("prediction", "answers", "exact", "f1"),
    [  # hand-checked against the official SQuAD v1.1 / v2 evaluation scripts
        ("Denver Broncos", ["Denver Broncos", "Denver"], 1.0, 1.0),
        ("the Broncos", ["Denver Broncos"], 0.0, 2 / 3),
        ("Santa Clara, California", ["Levi's Stadium", "Santa Clara, California"], 1.0, 1.0),
        ("1.5 million", ["1,500,000"], 0.0, 0.0),
        ("The  Eiffel tower!", ["eiffel Tower"], 1.0, 1.0),
        ("in the year 1998", ["1998"], 0.0, 0.5),
        ("", [], 1.0, 1.0),  # unanswerable, predicted so
        ("Paris", [], 0.0, 0.0),  # unanswerable, answered anyway
    ],
)
def test_squad_metric(prediction, answers, exact, f1):
    assert squad_scores(prediction, answers) == pytest.approx((exact, f1))


def test_long_contexts_become_windows_and_are_scored_on_text(tokenizer):
    t = task("what_has")
    row = {"_id": 7, "question": "what does bob have ?", "answer": "green kite",
           "context": " ".join(["alice has a red ball ."] * 12) + " bob has a green kite ."}
    row["answer_start"] = row["context"].index("green kite")
    features = t.task_type.featurize(t, [row], tokenizer, Limits(32, 8, doc_stride=8))
    assert len(features) > 3 and {f.example_id for f in features} == {7}
    inside = [f for f in features if f.start]
    assert len(inside) >= 1 and all(f.start == 0 and f.end == 0 for f in features[:-2])
    assert tokenizer.decode(inside[-1].rows[0][inside[-1].start:inside[-1].end + 1]) == \
        "green kite"

    batch = to_torch(collate(features, 0, tokenizer.pad_token_id, keep_text=True), "cpu")
    assert str(batch["answers"][0]).split(ANSWER_SEPARATOR) == ["green kite"]
    logits = torch.full((len(features), batch["input_ids"].shape[1], 2), -5.0)
    last = len(features) - 1  # the best span is in the last window: "green kite"
    logits[last, inside[-1].start, 0] = logits[last, inside[-1].end, 1] = 9.0
    logits[0, 5, 0] = logits[0, 6, 1] = 4.0  # a worse candidate in the first window
    mine = torch.ones(len(features), dtype=torch.bool)
    stats = TASK_TYPES["span"].stats({"span_logits": logits}, batch, mine)
    assert stats.sum(0).tolist() == [1.0, 1.0, 1.0]  # one example, exact, F1 1
    assert stats[0].tolist() == [1.0, 1.0, 1.0]  # counted on its first window


def test_answer_offsets_a_little_off_find_the_nearest_occurrence(tokenizer):
    t = task("what_has")
    context = "alice has a red ball . bob has a red kite ."
    row = {"_id": 0, "_origin": "f.json", "_row": 3, "question": "what does bob have ?",
           "context": context, "answer": "red kite", "answer_start": context.index("red kite") - 2}
    (f,) = t.task_type.featurize(t, [row], tokenizer, LIMITS)
    assert tokenizer.decode(f.rows[0][f.start:f.end + 1]) == "red kite"
    row["answer"] = "blue kite"
    with pytest.raises(DataError, match=r"f.json, row 3: answer 'blue kite' does not occur"):
        t.task_type.featurize(t, [row], tokenizer, LIMITS)


def test_generation_is_scored_on_decoded_text(model, tokenizer):
    features = featurize("summarize", tokenizer, n=3)
    batch = to_torch(collate(features, list(suite.SUITE).index("summarize"),
                             tokenizer.pad_token_id, keep_text=True), "cpu")
    assert [str(a) for a in batch["answers"]] == [
        r["target"] for r in task("summarize").source.sample("train", 3)]
    # (an untrained model generates nothing but special tokens: this one is made to say one
    # word of the first reference again and again, so that the scores are not all 0)
    model = copy.deepcopy(model).eval()
    word = tokenizer(str(batch["answers"][0]), add_special_tokens=False)["input_ids"][0]
    model.backbone.final_logits_bias[0, word] = 100.0
    stats = model.evaluate(batch)
    # the sums of ROUGE-L, -1, -2 F1 over the rows, and their count: the model's greedy
    # generation, decoded, scored against each row's reference text
    with torch.no_grad():
        texts = tokenizer.batch_decode(model.generate(model.prepare(batch)),
                                       skip_special_tokens=True)
    assert all(len(t.split()) >= 2 for t in texts), texts
    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge1", "rouge2"], use_stemmer=True)
    scores = [scorer.score(str(a), t) for a, t in zip(batch["answers"], texts)]
    row = stats[list(suite.SUITE).index("summarize")]
    assert row[3] == 3 and row[1] > 0 and row[:3].tolist() == pytest.approx(
        [sum(s[k].fmeasure for s in scores) for k in ("rougeL", "rouge1", "rouge2")])
    # scored against the generated text itself, each row scores 1
    stats = model.evaluate({**batch, "answers": np.array(texts, dtype=object)})
    assert stats[list(suite.SUITE).index("summarize")][:3].tolist() == pytest.approx([3.0] * 3)


def test_a_question_that_leaves_its_context_no_room_is_a_bad_row(tokenizer):
    t = task("what_has")
    row = t.source.sample("train", 1)[0]
    long = {**row, "question": " ".join(["alice"] * LIMITS.max_length)}
    with pytest.raises(DataError, match=r"row 0: the question is \d+ tokens, more than the \d+ "
                                        "that model.max_length"):
        t.task_type.featurize(t, [row, long], tokenizer, LIMITS)
    assert t.task_type.featurize(t, [row], tokenizer, LIMITS)  # (the row itself is fine)
