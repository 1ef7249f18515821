"""Classification (single sentence or pair, any number of labels) and regression.

Head: one per task, as in the paper (RoBERTa's classification head: dense + tanh + projection on
the first token). Loss: cross-entropy, scaled by log(number of labels); regression: MSE, unscaled.
Metrics: accuracy; Pearson correlation for regression.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muppet_ray.task_types.base import Features, TaskType, data_error, encode, log_of, token_types


class ClassificationHeads(nn.Module):
    """The per-task heads of every classification and regression task, stacked into one module.

    One module call serves all tasks: every micro-step then uses the same parameters on every
    worker whatever tasks it holds, which DeepSpeed needs (ZeRO-2 reduces gradients in buckets,
    ZeRO-3 gathers parameters per module call; both are collectives that must match across
    workers). A task's gradient still reaches only its own slice.
    """

    def __init__(self, hidden: int, num_outputs: list[int], dropout: float):
        super().__init__()
        num_heads, width = max(1, len(num_outputs)), max(num_outputs or [1])
        self.dense_weight = nn.Parameter(torch.randn(num_heads, hidden, hidden) * 0.02)
        self.dense_bias = nn.Parameter(torch.zeros(num_heads, hidden))
        self.out_weight = nn.Parameter(torch.randn(num_heads, hidden, width) * 0.02)
        self.out_bias = nn.Parameter(torch.zeros(num_heads, width))
        valid = torch.zeros(num_heads, width, dtype=torch.bool)
        for i, n in enumerate(num_outputs):
            valid[i, :n] = True
        self.register_buffer("valid", valid, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor, head_index: torch.Tensor) -> torch.Tensor:
        # All heads on every example, then each example keeps its own task's: for the tens of
        # tasks of the paper this costs far less than the backbone.
        hidden = torch.tanh(
            torch.einsum("eh,thk->etk", pooled, self.dense_weight) + self.dense_bias
        )
        hidden = self.dropout(hidden[torch.arange(len(head_index)), head_index])
        logits = torch.einsum("eh,ehk->ek", hidden, self.out_weight[head_index])
        logits = logits + self.out_bias[head_index]
        return logits.masked_fill(~self.valid[head_index], -1e4)


def _featurize(task, rows, tokenizer, limits, to_label) -> list[Features]:
    texts = [TaskType.field(task, r, "text") for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        encodings = [encode(tokenizer, [t], [p] if p is not None else None, limits.max_length)
                     for t, p in zip(texts, pairs)]
        ids = [e["input_ids"][0] for e in encodings]
        types = [token_types(e, 0) for e in encodings]
    else:
        enc = encode(tokenizer, texts, pairs if any(has_pair) else None, limits.max_length)
        ids = enc["input_ids"]
        types = [token_types(enc, i) for i in range(len(rows))]
    return [
        to_label(Features(example_id=r["_id"], rows=[ids[i]], token_types=types[i]), r)
        for i, r in enumerate(rows)
    ]


class Classification(TaskType):
    name = "classification"
    head = "classification"
    required_fields = ("text", "label")
    optional_fields = ("text_pair",)
    metric = "accuracy"
    num_stats = 3

    def featurize(self, task, rows, tokenizer, limits):
        index = {label: i for i, label in enumerate(task.labels)}

        def to_label(features: Features, row) -> Features:
            value = row.get("label")
            if value is None:
                raise data_error(task, row, "missing field 'label'")
            key = value if isinstance(value, str) else str(value)
            if key in index:
                features.label = index[key]
            elif (isinstance(value, int) and not isinstance(value, bool)
                  and 0 <= value < len(task.labels)):
                features.label = value  # a class index, as Hugging Face datasets store labels
            else:
                raise data_error(
                    task, row, f"label {value!r} is not in the label space {list(task.labels)}"
                )
            return features

        return _featurize(task, rows, tokenizer, limits, to_label)

    def loss(self, out, batch, mine):
        label = torch.where(mine, batch["label"], 0)
        loss = F.cross_entropy(out["class_logits"].float(), label, reduction="none")
        return loss, log_of(batch["num_outputs"])

    def stats(self, out, batch, mine):
        correct = (out["class_logits"].argmax(-1) == batch["label"]).float()
        return torch.stack([correct, torch.ones_like(correct), 1 / batch["num_outputs"]], -1)

    def finalize(self, stats, pairs=None):
        count = max(stats[1], 1)
        return {"accuracy": float(stats[0] / count), "chance": float(stats[2] / count)}


class Regression(TaskType):
    name = "regression"
    head = "classification"
    required_fields = ("text", "label")
    optional_fields = ("text_pair",)
    metric = "pearson"
    num_stats = 6
    keeps_pairs = True  # (Spearman's rank correlation needs every pair)

    def featurize(self, task, rows, tokenizer, limits):
        def to_target(features: Features, row) -> Features:
            value = row.get("label")
            try:
                if isinstance(value, bool):
                    raise ValueError
                features.target = float(value)  # numbers, or numeric text (CSV)
                if not math.isfinite(features.target):
                    raise ValueError
            except (TypeError, ValueError):
                raise data_error(task, row, f"label should be a finite number, got {value!r}"
                                 ) from None
            return features

        return _featurize(task, rows, tokenizer, limits, to_target)

    def loss(self, out, batch, mine):
        prediction = out["class_logits"][:, 0].float()
        loss = (prediction - batch["target"]) ** 2
        return loss, torch.ones_like(loss)  # regression is left unscaled (log_n = 1)

    def stats(self, out, batch, mine):
        x, y = out["class_logits"][:, 0].float(), batch["target"]
        return torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], -1)

    def pairs(self, out, batch, mine):
        """Each of its examples' (prediction, target), for Spearman's correlation."""
        return torch.stack([out["class_logits"][:, 0].float(), batch["target"]], -1)[mine]

    def finalize(self, stats, pairs=None):
        n, sx, sy, sxx, syy, sxy = (float(s) for s in stats)
        if n < 2:
            return {"pearson": 0.0, "spearman": 0.0, "mse": float("nan")}
        cov = sxy / n - (sx / n) * (sy / n)
        var_x, var_y = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
        pearson = cov / np.sqrt(var_x * var_y) if var_x > 1e-12 and var_y > 1e-12 else 0.0
        metrics = {"pearson": float(pearson)}
        if pairs is not None and len(pairs) >= 2 and np.ptp(pairs, axis=0).min() > 0:
            import scipy.stats  # (here: 0.5 s of every process's start-up otherwise)

            metrics["spearman"] = float(scipy.stats.spearmanr(pairs[:, 0], pairs[:, 1])[0])
        elif pairs is not None:
            metrics["spearman"] = 0.0  # (a constant prediction or target: no correlation)
        return {**metrics, "mse": float((sxx - 2 * sxy + syy) / n)}
