"""Multiple choice (commonsense and the like): one score per (context, choice) pair, softmax over
an example's choices, which may number differently from example to example.

Head: one shared by all multiple-choice tasks (paper §3.1). Loss: cross-entropy over the choices,
scaled by log(number of choices). Metric: accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from muppet_ray.task_types.base import Features, TaskType, data_error, encode, token_types


class MultipleChoiceHead(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(torch.tanh(self.dense(pooled)))).squeeze(-1)


def _group_max(scores: torch.Tensor, row_example: torch.Tensor, num_examples: int):
    empty = torch.full((num_examples,), float("-inf"), device=scores.device)
    return empty.scatter_reduce(0, row_example, scores, "amax")


class MultipleChoice(TaskType):
    name = "multiple_choice"
    head = "multiple_choice"
    required_fields = ("choices", "label")
    optional_fields = ("context", "question")
    metric = "accuracy"
    num_stats = 3

    def featurize(self, task, rows, tokenizer, limits):
        firsts, choices, owners = [], [], []
        for i, row in enumerate(rows):
            options = self.field(task, row, "choices", list)
            if len(options) < 2 or not all(isinstance(c, str) for c in options):
                raise data_error(task, row, "choices should be a list of 2 or more texts")
            label = row.get("label")
            if isinstance(label, str) and label.strip().isdigit():
                label = row["label"] = int(label)  # CSV and some datasets store it as text
            if isinstance(label, bool) or not isinstance(label, int):
                raise data_error(task, row, f"label should be a choice index, got {label!r}")
            if not 0 <= label < len(options):
                raise data_error(
                    task, row, f"label {label} is outside the {len(options)} choices"
                )
            prompt = " ".join(str(row.get(k) or "") for k in ("context", "question")).strip()
            firsts += [prompt] * len(options)
            choices += options
            owners += [i] * len(options)
        enc = encode(tokenizer, firsts, choices, limits.max_length)
        features = [Features(example_id=r["_id"], rows=[], label=r["label"]) for r in rows]
        for j, owner in enumerate(owners):
            features[owner].rows.append(enc["input_ids"][j])
            types = token_types(enc, j)
            if types is not None:
                features[owner].token_types = (features[owner].token_types or []) + types
        return features

    def loss(self, out, batch, mine):
        scores = out["choice_scores"].float()
        row_example, num_examples = batch["row_example"], batch["label"].shape[0]
        top = _group_max(scores, row_example, num_examples).detach()
        summed = torch.zeros(num_examples, device=scores.device).index_add(
            0, row_example, torch.exp(scores - top[row_example])
        )
        log_partition = torch.log(summed) + top
        correct_row = batch["first_row"] + torch.where(mine, batch["label"], 0)
        num_choices = torch.bincount(row_example, minlength=num_examples)
        return log_partition - scores[correct_row], torch.log(num_choices.clamp(min=2).float())

    def stats(self, out, batch, mine):
        scores, row_example = out["choice_scores"].float(), batch["row_example"]
        num_examples = batch["label"].shape[0]
        top = _group_max(scores, row_example, num_examples)
        rows = torch.arange(len(scores), device=scores.device)
        is_top = scores >= top[row_example]
        best_row = torch.full((num_examples,), len(scores), device=scores.device).scatter_reduce(
            0, row_example, torch.where(is_top, rows, len(scores)), "amin"
        )
        correct = ((best_row - batch["first_row"]) == batch["label"]).float()
        num_choices = torch.bincount(row_example, minlength=num_examples).clamp(min=1)
        return torch.stack([correct, torch.ones_like(correct), 1 / num_choices], -1)

    def finalize(self, stats, pairs=None):
        count = max(stats[1], 1)
        return {"accuracy": float(stats[0] / count), "chance": float(stats[2] / count)}
