"""Extractive question answering: start and end positions of the answer in the context.

Head: one span head shared by all reading-comprehension tasks (paper §3.1). Loss: mean of the
start and end cross-entropies, scaled by log(number of positions in the sequence). Long contexts
are cut into overlapping windows (`doc_stride` tokens shared); each window is trained on its own,
pointing at the first token when the answer is not inside it. Metric: SQuAD exact match and F1
on text, of the best span over all of an example's windows, against any of its gold answers.
"""

from __future__ import annotations

import collections
import re
import string

import torch
import torch.nn.functional as F
from torch import nn

from muppet_ray.task_types.base import Features, TaskType, data_error

MAX_ANSWER_TOKENS = 30
ANSWER_SEPARATOR = "\x1f"


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1) of a prediction against the best-matching gold answer (official
    SQuAD v1.1 / v2 definitions; no gold answers means the question is unanswerable)."""
    best_exact = best_f1 = 0.0
    for answer in answers or [""]:
        predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
        exact = float(predicted == gold)
        if not predicted or not gold:
            f1 = exact
        else:
            common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
            f1 = 0.0 if common == 0 else 2 * common / (len(predicted) + len(gold))
        best_exact, best_f1 = max(best_exact, exact), max(best_f1, f1)
    return best_exact, best_f1


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
    optional_fields = ("answer", "answer_start", "answers")  # no answer: unanswerable
    metric = "f1"
    num_stats = 3

    def featurize(self, task, rows, tokenizer, limits):
        questions = [self.field(task, r, "question") for r in rows]
        contexts = [self.field(task, r, "context") for r in rows]
        # A window holds the question, its special tokens and more than doc_stride tokens of
        # context: a longer question leaves none (the tokenizer would fail the whole batch).
        room = (limits.max_length - limits.doc_stride - 1
                - tokenizer.num_special_tokens_to_add(pair=True))
        for row, ids in zip(rows, tokenizer(questions, add_special_tokens=False)["input_ids"]):
            if len(ids) > room:
                raise data_error(task, row, f"the question is {len(ids)} tokens, more than the "
                                 f"{room} that model.max_length {limits.max_length} and "
                                 f"model.doc_stride {limits.doc_stride} leave it")
        enc = tokenizer(questions, contexts, truncation="only_second",
                        max_length=limits.max_length, stride=limits.doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        answers = [self._answer(task, row, context) for row, context in zip(rows, contexts)]
        features = []
        for window, owner in enumerate(enc["overflow_to_sample_mapping"]):
            row, (answer, start_char) = rows[owner], answers[owner]
            sequence = enc.sequence_ids(window)
            in_context = [j for j, s in enumerate(sequence) if s == 1]
            offsets = enc["offset_mapping"][window]
            end_char = start_char + len(answer)
            covering = [j for j in in_context
                        if answer and offsets[j][0] < end_char and offsets[j][1] > start_char]
            whole = bool(covering) and offsets[covering[0]][0] <= start_char and offsets[
                covering[-1]][1] >= end_char
            # Only a window holding the whole answer points at it; others point at token 0.
            start, end = (covering[0], covering[-1]) if whole else (0, 0)
            types = enc.get("token_type_ids")
            features.append(Features(
                example_id=row["_id"], rows=[enc["input_ids"][window]],
                token_types=[types[window]] if types is not None else None,
                start=start, end=end,
                context_start=in_context[0] if in_context else 0,
                context_end=in_context[-1] if in_context else 0,
                offsets=[tuple(o) if s == 1 else (0, 0) for o, s in zip(offsets, sequence)],
                context=contexts[owner],
                answers=[a for a in row.get("answers") or [answer] if a],
            ))
        return features

    def _answer(self, task, row, context: str) -> tuple[str, int]:
        answer = row.get("answer") or ""
        if not answer:  # no answer text: an unanswerable question, as in SQuAD v2
            return "", -1
        start = self.field(task, row, "answer_start", int)
        if not 0 <= start < len(context):
            raise data_error(task, row, f"answer_start {start} is outside its context "
                             f"(0 to {len(context) - 1})")
        if context[start:start + len(answer)] == answer:
            return answer, start
        # Some real datasets have offsets a few characters off: take the nearest occurrence.
        found = [i for i in range(len(context)) if context.startswith(answer, i)]
        if not found:
            raise data_error(task, row, f"answer {answer[:40]!r} does not occur in the context")
        return answer, min(found, key=lambda i: abs(i - start))

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
        """Per window: the example's scores on its first window, zeros on the others."""
        logits = out["span_logits"].float()
        start, end = self.best_spans(logits, batch["context_start"], batch["context_end"])
        rows = torch.arange(len(start), device=logits.device)
        span_score = logits[rows, start, 0] + logits[rows, end, 1]
        null_score = logits[:, 0, 0] + logits[:, 0, 1]
        stats = torch.zeros(len(start), 3)
        best: dict[int, tuple[float, int]] = {}  # example -> (score, window)
        ids = batch["example_id"].tolist()
        for window, (example, score) in enumerate(zip(ids, span_score.tolist())):
            if mine[window] and (example not in best or score > best[example][0]):
                best[example] = (score, window)
        first = {}
        for window, example in enumerate(ids):
            first.setdefault(example, window)
        offsets = batch["offsets"]
        for example, (score, window) in best.items():
            context = str(batch["context"][window])
            answers = [a for a in str(batch["answers"][window]).split(ANSWER_SEPARATOR) if a]
            if not answers and score < float(null_score[window]):
                prediction = ""  # predicted unanswerable
            else:
                s, e = int(start[window]), int(end[window])
                prediction = context[int(offsets[window, s, 0]):int(offsets[window, e, 1])]
            exact, f1 = squad_scores(prediction, answers)
            stats[first[example]] = torch.tensor([exact, f1, 1.0])
        return stats.to(logits.device)

    def finalize(self, stats, pairs=None):
        count = max(stats[2], 1)
        return {"f1": float(stats[1] / count), "exact_match": float(stats[0] / count)}
