"""The denoising task type (task_types/denoising.py): examples built as specified, for encoders
(masked tokens) and encoder-decoders (cut-out spans), and both backbones learning from them."""

import copy
import math
import re

import numpy as np
import pytest
import torch

from muppet_ray import suite
from muppet_ray.batch import collate, to_torch
from muppet_ray.config import ModelConfig, validate
from muppet_ray.errors import ConfigError, DataError
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.sources import PARSERS
from muppet_ray.task_types import IGNORE, TASK_TYPES, Limits
from muppet_ray.task_types.denoising import noise_spans
from muppet_ray.tasks import HeadLayout, Task, custom_task
from tests.test_task_types import suite_tokenizer

LIMITS = Limits(max_length=64, max_target_length=48)
DENOISING = TASK_TYPES["denoising"]


@pytest.fixture(scope="module")
def tokenizer():
    return suite_tokenizer()


def texts(n: int) -> list[dict]:
    """Rows of plain text: the built-in suite's summarization sources (several sentences)."""
    return [{"_id": i, "text": suite.example("summarize", "train", i, 0)["source"]}
            for i in range(n)]


def denoising(style: str, density: float = 0.15, mean_span: float = 3.0) -> Task:
    return Task("noise", "denoising", None, noise=(style, density, mean_span))


def test_masked_tokens_follow_berts_rule(tokenizer):
    rows = texts(800)
    features = DENOISING.featurize(denoising("mlm"), rows, tokenizer, LIMITS)
    fates = {"masked": 0, "random": 0, "kept": 0}
    for f, row in zip(features, rows):
        original = tokenizer(row["text"], truncation=True, max_length=64,
                             return_special_tokens_mask=True)
        ids, labels = np.array(f.rows[0]), np.array(f.decoder_labels)
        chosen = np.flatnonzero(labels != IGNORE)
        ordinary = np.flatnonzero(np.array(original["special_tokens_mask"]) == 0)
        # exactly round(15%) of the ordinary tokens, never a special one, labelled as they were
        assert len(chosen) == max(round(0.15 * len(ordinary)), 1)
        assert set(chosen) <= set(ordinary)
        assert (labels[chosen] == np.array(original["input_ids"])[chosen]).all()
        unchosen = np.setdiff1d(np.arange(len(ids)), chosen)
        assert (ids[unchosen] == np.array(original["input_ids"])[unchosen]).all()
        for i in chosen:
            fate = ("masked" if ids[i] == tokenizer.mask_token_id else
                    "kept" if ids[i] == labels[i] else "random")
            fates[fate] += 1
            assert fate == "masked" or ids[i] not in tokenizer.all_special_ids
    total = sum(fates.values())
    assert total > 2000
    for fate, share in (("masked", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(fates[fate] / total - share) < 0.03, fates  # (sd ~0.008 at this count)
    again = DENOISING.featurize(denoising("mlm"), rows[:5], tokenizer, LIMITS)
    assert [f.rows for f in again] == [f.rows for f in features[:5]]  # seeded per example


def test_spans_are_drawn_as_t5_draws_them():
    rng = np.random.default_rng(0)
    lengths = []
    for length in (10, 37, 64, 200):
        for _ in range(200):
            mask = noise_spans(length, 0.15, 3.0, rng)
            noise = round(0.15 * length)
            starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
            ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
            assert len(mask) == length and mask.sum() == noise
            assert len(starts) == max(round(noise / 3.0), 1)
            assert not mask[0]  # (kept tokens first, as in T5)
            lengths += (ends - starts + 1).tolist()
    assert abs(np.mean(lengths) - 3.0) < 0.2


def test_cut_out_spans_become_one_mask_each_and_the_decoder_writes_the_text(tokenizer):
    rows = texts(50)
    features = DENOISING.featurize(denoising("spans", 0.3, 2.0), rows, tokenizer, LIMITS)
    for f, row in zip(features, rows):
        encoded = tokenizer(row["text"], truncation=True, max_length=LIMITS.max_target_length,
                            return_special_tokens_mask=True)
        assert f.decoder_labels == encoded["input_ids"]
        special = [t for t, s in zip(encoded["input_ids"], encoded["special_tokens_mask"]) if s]
        tokens = [t for t, s in zip(encoded["input_ids"], encoded["special_tokens_mask"]) if not s]
        assert len(tokens) > 10 and special
        source = [t for t in f.rows[0] if t not in special]
        noise = round(0.3 * len(tokens))
        masks = source.count(tokenizer.mask_token_id)
        assert masks == max(round(noise / 2.0), 1)
        assert len(source) == len(tokens) - noise + masks
        # In place: split at the masks, the source is runs of the text's tokens, the first at
        # its start, each next one after at least one cut-out token, the text's end reached
        # (kept tokens first, as in T5; two masks never side by side: a span is one mask).
        runs, run = [], []
        for t in source:
            if t == tokenizer.mask_token_id:
                runs.append(run)
                run = []
            else:
                run.append(t)
        runs.append(run)
        assert runs[0] and all(runs[1:-1])
        end = len(runs[0])
        assert runs[0] == tokens[:end]
        for run in filter(None, runs[1:]):
            start = next(i for i in range(end + 1, len(tokens) - len(run) + 1)
                         if tokens[i:i + len(run)] == run)
            end = start + len(run)
        assert end == len(tokens) or not runs[-1]


def small_model(arch: str, tokenizer, layouts):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, hidden_size=32, ffn_size=64, num_heads=4, num_layers=1,
                         max_length=64)
    return MuppetModel(build_backbone(config, tokenizer), layouts, dropout=0.0,
                       max_target_length=48, tokenizer=tokenizer)


@pytest.mark.parametrize("arch,style", [("bert", "mlm"), ("bart", "spans")])
def test_denoising_trains_on_both_backbone_kinds(tokenizer, arch, style):
    layouts = [HeadLayout("noise", "denoising", 0),
               HeadLayout("sentiment", "classification", 2, ("negative", "positive"))]
    model = small_model(arch, tokenizer, layouts)
    batch = to_torch(collate(DENOISING.featurize(denoising(style), texts(8), tokenizer, LIMITS),
                             0, tokenizer.pad_token_id), "cpu")
    prepared = model.prepare(batch)
    out = model.head_outputs(prepared, model.encode(prepared))
    _, log_n = DENOISING.loss(out, prepared, torch.ones(8, dtype=torch.bool))
    assert torch.allclose(log_n, torch.full_like(log_n, math.log(len(tokenizer))))
    # every parameter gets a gradient from a denoising micro-batch and from another task's
    # (the masked-LM head then sees no token: DeepSpeed's collectives stay in step)
    rows = [{"_id": i, "text": "a fine day", "label": "positive"} for i in range(4)]
    sentiment = Task("sentiment", "classification", None, ("negative", "positive"))
    other = to_torch(collate(sentiment.task_type.featurize(sentiment, rows, tokenizer, LIMITS),
                             1, tokenizer.pad_token_id), "cpu")
    for micro_batch in (batch, other):
        model.zero_grad()
        model(micro_batch)["loss"].backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses[::5]
    stats = model.evaluate(batch)[0, :2]
    assert stats[1] > 0 and DENOISING.finalize(stats.numpy())["accuracy"] > 0.2


def test_bad_denoising_settings_and_rows_get_one_line_errors(tokenizer):
    errors = []
    for key, value, expected in (("noise_density", 1.5, "less than 1"),
                                 ("mean_span", 0.5, "greater than or equal to 1")):
        with pytest.raises(ConfigError, match=rf"tasks.custom.0.{key}: Input should be "
                                              rf"{expected}") as info:
            validate({"tasks": {"custom": [{"name": "n", "type": "denoising", "train": "x.txt",
                                            "format": "text", key: value}]}})
        errors.append(info.value)
    # (on another task they would do nothing)
    for spec, expected in (({"type": "classification", "labels": ["a", "b"], "mean_span": 2},
                            "mean_span: only for type denoising (this task: classification)"),
                           ({"format": "bigbench", "noise_density": 0.3, "mean_span": 2.5},
                            "mean_span, noise_density: only for type denoising (this task: "
                            "bigbench, typed by its file)")):
        with pytest.raises(ConfigError, match=rf"task 'n': {re.escape(expected)}$") as info:
            validate({"tasks": {"custom": [{"name": "n", "train": "x", **spec}]}})
        errors.append(info.value)
    spans = {"name": "n", "type": "denoising", "format": "text", "train": "x", "mean_span": 2}
    bart, bert = (validate({"model": {"arch": arch}, "tasks": {"custom": [spans]}})
                  for arch in ("bart", "bert"))
    assert custom_task(bart.tasks.custom[0], bart).noise == ("spans", 0.15, 2)
    with pytest.raises(ConfigError, match="task 'n': mean_span is for an encoder-decoder's "
                                          "spans; on an encoder, .*one by one") as info:
        custom_task(bert.tasks.custom[0], bert)
    errors.append(info.value)
    with pytest.raises(DataError, match="task 'noise', .*row .*: missing field 'text'") as info:
        DENOISING.featurize(denoising("mlm"), [{"_id": 0, "body": "no text field"}], tokenizer,
                            LIMITS)
    errors.append(info.value)
    with pytest.raises(DataError, match="task 'noise', .*row .*: text has no tokens to "
                                        "denoise") as info:
        DENOISING.featurize(denoising("mlm"), [{"_id": 0, "text": ""}], tokenizer, LIMITS)
    errors.append(info.value)
    maskless = copy.deepcopy(tokenizer)
    maskless.mask_token = None
    with pytest.raises(DataError, match="task 'noise', .*: denoising needs a tokenizer with a "
                                        "mask token; .* has none") as info:
        DENOISING.featurize(denoising("mlm"), texts(2), maskless, LIMITS)
    errors.append(info.value)
    assert all("\n" not in str(e) for e in errors)


def test_a_plain_text_file_is_a_row_per_line():
    rows = list(PARSERS["text"](b"first line\n\n  second line  \n", "corpus.txt"))
    assert rows == [(1, {"text": "first line"}), (3, {"text": "second line"})]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_masked_lm_head_is_the_checkpoints_own_where_it_has_one(tmp_path, arch):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertModel,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    from muppet_ray.task_types.denoising import MaskedLMHead, pretrained_head

    torch.manual_seed(0)
    size = dict(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32)
    masked_lm = (BertForMaskedLM(BertConfig(**size)) if arch == "bert"
                 else RobertaForMaskedLM(RobertaConfig(**size)))
    masked_lm.save_pretrained(tmp_path / "with")
    own = (masked_lm.cls.predictions.transform if arch == "bert" else masked_lm.lm_head)
    found = pretrained_head(str(tmp_path / "with"))
    assert sorted(found) == ["decoder.bias", "dense.bias", "dense.weight", "norm.bias",
                             "norm.weight"]
    assert torch.equal(found["dense.weight"], own.dense.weight)
    head = MaskedLMHead(masked_lm.get_input_embeddings())
    assert head.load_pretrained(found) == sorted(found)
    hidden = torch.randn(3, 16)
    with torch.no_grad():  # the same logits as the checkpoint's own masked-LM head
        expected = (masked_lm.cls if arch == "bert" else masked_lm.lm_head)(hidden)
        assert torch.allclose(head(hidden), expected, atol=1e-5)
    # a checkpoint without one (an encoder saved alone; MiniLM's): a new head
    BertModel(BertConfig(**size)).save_pretrained(tmp_path / "without")
    assert pretrained_head(str(tmp_path / "without")) == {}
