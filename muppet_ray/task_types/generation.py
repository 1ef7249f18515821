"""Summarization / generation with an encoder-decoder backbone.

Head: the backbone's own decoder and LM head. Loss: token cross-entropy averaged over the target,
scaled by log(vocabulary size). Metric: ROUGE-L F1 of greedy decoding against the reference
text, over words as `rouge-score` splits them by default (lower-cased letters and digits).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from muppet_ray.task_types.base import IGNORE, Features, TaskType, encode


def rouge_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: list, reference: list) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence)."""
    if not prediction or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for p in prediction:
        current = [0]
        for j, r in enumerate(reference):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


class Generation(TaskType):
    name = "generation"
    head = "generation"
    required_fields = ("source", "target")
    metric = "rougeL"
    num_stats = 2

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
        """ROUGE-L of the decoded prediction against the reference text."""
        predictions = out["tokenizer"].batch_decode(out["generated"], skip_special_tokens=True)
        scores = [rouge_l(rouge_words(p), rouge_words(str(reference))) if is_mine else 0.0
                  for p, reference, is_mine in zip(predictions, batch["answers"],
                                                   mine.tolist())]
        rouge = torch.tensor(scores, device=mine.device)
        return torch.stack([rouge, torch.ones_like(rouge)], -1)

    def finalize(self, stats):
        return {"rougeL": float(stats[0] / max(stats[1], 1))}
