"""Extractive question answering: start and end positions of the answer in the context.

Head: one span head shared by all reading-comprehension tasks (paper §3.1). Loss: mean of the
start and end cross-entropies, scaled by log(number of positions in the sequence). Metric:
exact match and F1 between predicted and gold spans (over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muppet_ray.task_types.base import Features, TaskType, data_error, encode, token_types

MAX_ANSWER_TOKENS = 30


class SpanHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # [E, L, 2]: start and end logits per token


class Span(TaskType):
    name = "span"
    head = "span"
    required_fields = ("question", "context")
    optional_fields = ("answer", "answer_start")  # empty answer: unanswerable
    metric = "f1"
    num_stats = 3

    def featurize(self, task, rows, tokenizer, limits):
        questions = [self.field(task, r, "question") for r in rows]
        contexts = [self.field(task, r, "context") for r in rows]
        enc = encode(tokenizer, questions, contexts, limits.max_length, only_second=True,
                     return_offsets_mapping=True)
        features = []
        for i, row in enumerate(rows):
            answer = row.get("answer") or ""
            start_char = row.get("answer_start")
            if answer:  # (no answer text: an unanswerable question, as in SQuAD v2)
                start_char = self.field(task, row, "answer_start", int)
                if contexts[i][start_char:start_char + len(answer)] != answer:
                    raise data_error(task, row, "answer_start does not point at the answer "
                                                "text in the context")
            in_context = [j for j, s in enumerate(enc.sequence_ids(i)) if s == 1]
            offsets = enc["offset_mapping"][i]
            start = end = 0  # no answer, or truncated away: point at the first token
            covering = [j for j in in_context if answer and offsets[j][0] < start_char + len(
                answer) and offsets[j][1] > start_char]
            if covering:
                start, end = covering[0], covering[-1]
            features.append(Features(
                example_id=row["_id"], rows=[enc["input_ids"][i]], token_types=token_types(enc, i),
                start=start, end=end,
                context_start=in_context[0] if in_context else 0,
                context_end=in_context[-1] if in_context else 0,
            ))
        return features

    def loss(self, out, batch, mine):
        logits = out["span_logits"].float()
        real = batch["first_row_mask"]
        logits = logits.masked_fill(~real.unsqueeze(-1), -1e4)
        start = torch.where(mine, batch["start"], 0)
        end = torch.where(mine, batch["end"], 0)
        loss = (F.cross_entropy(logits[..., 0], start, reduction="none")
                + F.cross_entropy(logits[..., 1], end, reduction="none")) / 2
        return loss, torch.log(real.sum(-1).clamp(min=2).float())

    @staticmethod
    def best_spans(logits: torch.Tensor, context_start, context_end):
        """The highest-scoring (start <= end) span inside each example's context."""
        length = logits.shape[1]
        positions = torch.arange(length, device=logits.device)
        inside = (positions >= context_start[:, None]) & (positions <= context_end[:, None])
        start = logits[..., 0].float().masked_fill(~inside, -1e9)
        end = logits[..., 1].float().masked_fill(~inside, -1e9)
        scores = start[:, :, None] + end[:, None, :]
        offset = positions[None, :] - positions[:, None]
        band = (offset >= 0) & (offset < MAX_ANSWER_TOKENS)
        best = scores.masked_fill(~band, -2e9).flatten(1).argmax(-1)
        return best // length, best % length

    def stats(self, out, batch, mine):
        pred_start, pred_end = self.best_spans(
            out["span_logits"], batch["context_start"], batch["context_end"]
        )
        gold_start, gold_end = batch["start"], batch["end"]
        overlap = (torch.minimum(pred_end, gold_end) - torch.maximum(pred_start, gold_start) + 1)
        overlap = overlap.clamp(min=0).float()
        precision = overlap / (pred_end - pred_start + 1).float()
        recall = overlap / (gold_end - gold_start + 1).clamp(min=1).float()
        f1 = torch.where(overlap > 0, 2 * precision * recall / (precision + recall), 0.0)
        exact = ((pred_start == gold_start) & (pred_end == gold_end)).float()
        return torch.stack([exact, f1, torch.ones_like(f1)], -1)

    def finalize(self, stats):
        count = max(stats[2], 1)
        return {"f1": float(stats[1] / count), "exact_match": float(stats[0] / count)}
