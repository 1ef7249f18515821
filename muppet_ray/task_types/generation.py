"""Summarization / generation with an encoder-decoder backbone.

Head: the backbone's own decoder and LM head. Loss: token cross-entropy averaged over the target,
scaled by log(vocabulary size). Metrics: ROUGE-1, -2 and -L F1 of greedy decoding against the
reference text, by Google's `rouge-score` with Porter stemming (as the paper and BART report
summarization); ROUGE-L is the headline.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from muppet_ray.task_types.base import IGNORE, Features, TaskType, encode

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

ROUGE = ("rougeL", "rouge1", "rouge2")


@functools.cache
def rouge() -> rouge_scorer.RougeScorer:
    # (imported here: 0.6 s, with nltk, of every process's start-up otherwise)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(ROUGE, use_stemmer=True)


class Generation(TaskType):
    name = "generation"
    head = "generation"
    required_fields = ("source", "target")
    metric = "rougeL"
    num_stats = len(ROUGE) + 1

    def featurize(self, task, rows, tokenizer, limits):
        sources = [self.field(task, r, "source") for r in rows]
        targets = [self.field(task, r, "target") for r in rows]
        enc = encode(tokenizer, sources, None, limits.max_length)
        labels = tokenizer(text_target=targets, truncation=True,
                           max_length=limits.max_target_length)["input_ids"]
        return [
            Features(example_id=r["_id"], rows=[enc["input_ids"][i]], decoder_labels=labels[i],
                     answers=[targets[i]])
            for i, r in enumerate(rows)
        ]

    def loss(self, out, batch, mine):
        logits, labels = out["lm_logits"].float(), batch["decoder_labels"]
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                 reduction="none")
        counted = (labels != IGNORE).sum(-1)
        loss = tokens.sum(-1) / counted.clamp(min=1)
        return loss, torch.full_like(loss, float(logits.shape[-1])).log()

    def stats(self, out, batch, mine):
        """ROUGE F1 scores of the decoded prediction against the reference text, and a count."""
        predictions = out["tokenizer"].batch_decode(out["generated"], skip_special_tokens=True)
        rows = []
        for prediction, reference, is_mine in zip(predictions, batch["answers"], mine.tolist()):
            scores = rouge().score(str(reference), prediction) if is_mine else {}
            rows.append([scores[k].fmeasure if scores else 0.0 for k in ROUGE] + [1.0])
        return torch.tensor(rows, device=mine.device)

    def finalize(self, stats, pairs=None):
        count = max(stats[len(ROUGE)], 1)
        return {name: float(stats[i] / count) for i, name in enumerate(ROUGE)}
