"""Self-supervised denoising (ExT5's idea: a self-supervised objective in the supervised mixture),
over any text: a text column of any task's files, or a plain text file (format `text`).

Encoders: masked-token prediction (BERT's MLM). `noise_density` of each text's tokens (not its
special tokens), rounded, at least one, are chosen; of those 80% become the mask token, 10% a
random token, 10% stay (BERT's rule), and the model predicts every chosen one. Head: a masked-LM
head (dense, GELU, LayerNorm, a projection to the vocabulary started from the word embeddings):
the pretrained checkpoint's own where it carries one (engine.build_engine), else a new one.

Encoder-decoders: T5's span corruption, written as BART's text infilling. round(noise_density x
tokens) tokens, in round(that / mean_span) spans (at least one), are cut out: the noise and the
kept tokens are each split into that many runs of random lengths (T5's random_spans_noise_mask),
kept and noise alternating, kept first. Each cut span becomes one mask token in the source (BART
has no sentinel tokens), and the decoder writes the whole text back (BART's pre-training
objective). Texts are cut to model.max_target_length tokens first (the decoder's length).

Loss: token cross-entropy over the predicted tokens, averaged per example, scaled by
log(vocabulary size). Metric: the accuracy of those tokens (teacher-forced).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muppet_ray.task_types.base import IGNORE, Features, TaskType, data_error

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens (BERT); the rest stay themselves


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head. Its projection has its own weights, started from the word
    embeddings (a tied one would be read outside its module, where ZeRO-3 does not gather it)."""

    def __init__(self, embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        width = embeddings.embedding_dim
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, embeddings.num_embeddings)
        with torch.no_grad():
            self.decoder.weight.copy_(embeddings.weight)
            self.decoder.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))

    def load_pretrained(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Take a checkpoint's own head (pretrained_head) where its shapes fit; the names
        taken."""
        mine = self.state_dict()
        fitting = {k: v for k, v in tensors.items() if k in mine and v.shape == mine[k].shape}
        self.load_state_dict(fitting, strict=False)
        return sorted(fitting)


# A checkpoint's own masked-LM head (BERT's, RoBERTa's), as MaskedLMHead names its tensors; the
# projection's weight is tied to the word embeddings there, which MaskedLMHead starts from.
PRETRAINED_HEAD_KEYS = {
    "cls.predictions.transform.dense.weight": "dense.weight",
    "cls.predictions.transform.dense.bias": "dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "norm.weight",
    "cls.predictions.transform.LayerNorm.gamma": "norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "norm.bias",
    "cls.predictions.transform.LayerNorm.beta": "norm.bias",
    "cls.predictions.bias": "decoder.bias",
    "lm_head.dense.weight": "dense.weight",
    "lm_head.dense.bias": "dense.bias",
    "lm_head.layer_norm.weight": "norm.weight",
    "lm_head.layer_norm.bias": "norm.bias",
    "lm_head.bias": "decoder.bias",
}


def pretrained_head(model: str) -> dict[str, torch.Tensor]:
    """The masked-LM head a pretrained checkpoint (a local directory, or a Hub id, whose files
    building the backbone fetched already) carries, keyed as MaskedLMHead's; {} where it has
    none (e.g. sentence-transformers' MiniLM) or its weights are sharded."""
    from transformers.utils import cached_file

    def file(name: str) -> str | None:
        return cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    if path := file("model.safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {PRETRAINED_HEAD_KEYS[k]: f.get_tensor(k)
                    for k in set(f.keys()) & set(PRETRAINED_HEAD_KEYS)}
    if path := file("pytorch_model.bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {PRETRAINED_HEAD_KEYS[k]: v for k, v in state.items() if k in PRETRAINED_HEAD_KEYS}
    return {}


def _ordinary_ids(tokenizer) -> np.ndarray:
    """The vocabulary's ids but its special tokens' (what a random replacement draws from)."""
    return np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)


def noise_spans(length: int, density: float, mean_span: float, rng: np.random.Generator
                ) -> np.ndarray:
    """T5's random_spans_noise_mask: a boolean mask over `length` tokens with round(density x
    length) noise tokens (at least 1, at most length - 1) in round(noise / mean_span) spans (at
    least 1), kept and noise runs alternating, kept first."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    spans = min(spans, noise, length - noise)

    def runs(total: int) -> np.ndarray:  # `total` split into `spans` positive parts
        cuts = np.sort(rng.choice(np.arange(1, total), spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    kept, noisy = runs(length - noise), runs(noise)
    mask = np.concatenate([np.concatenate([np.zeros(k, bool), np.ones(n, bool)])
                           for k, n in zip(kept, noisy)])
    return mask


class Denoising(TaskType):
    name = "denoising"
    head = "denoising"
    required_fields = ("text",)
    metric = "accuracy"
    num_stats = 2

    def featurize(self, task, rows, tokenizer, limits):
        style, density, mean_span = task.noise
        if tokenizer.mask_token_id is None:
            raise data_error(task, rows[0], "denoising needs a tokenizer with a mask token; "
                             f"{type(tokenizer).__name__} has none")
        texts = [self.field(task, row, "text") for row in rows]
        # (one call for all rows: the fast tokenizers work in batches)
        encoded = tokenizer(texts, truncation=True, return_special_tokens_mask=True,
                            max_length=limits.max_length if style == "mlm"
                            else limits.max_target_length)
        seed = zlib.crc32(task.name.encode())
        noise = (functools.partial(self._masked, replacements=_ordinary_ids(tokenizer))
                 if style == "mlm" else self._infilled)
        features = []
        for row, ids, special in zip(rows, encoded["input_ids"], encoded["special_tokens_mask"]):
            ordinary = np.array(special) == 0
            if not ordinary.any():  # (it would count as an example with nothing to predict)
                raise data_error(task, row, "text has no tokens to denoise (empty?)")
            features.append(Features(example_id=row["_id"], **noise(
                np.array(ids), ordinary, tokenizer, density, mean_span,
                np.random.default_rng([seed, row["_id"]]))))
        return features

    @staticmethod
    def _masked(ids, ordinary, tokenizer, density, mean_span, rng, replacements) -> dict:
        """`replacements`: the ids a random replacement draws from (_ordinary_ids, made once a
        call: the vocabulary is tens of thousands of ids)."""
        candidates = np.flatnonzero(ordinary)
        labels = np.full(len(ids), IGNORE)
        count = max(int(round(len(candidates) * density)), 1)
        chosen = np.sort(rng.choice(candidates, count, replace=False))
        labels[chosen] = ids[chosen]
        fate = rng.random(count)
        ids[chosen[fate < MASK_SHARE]] = tokenizer.mask_token_id
        swapped = chosen[(fate >= MASK_SHARE) & (fate < MASK_SHARE + RANDOM_SHARE)]
        ids[swapped] = rng.choice(replacements, len(swapped))
        return {"rows": [ids.tolist()], "decoder_labels": labels.tolist()}

    @staticmethod
    def _infilled(ids, ordinary, tokenizer, density, mean_span, rng) -> dict:
        cut = np.zeros(len(ids), bool)
        if ordinary.sum() >= 2:  # (else nothing to cut and keep: the text is its own source)
            cut[ordinary] = noise_spans(int(ordinary.sum()), density, mean_span, rng)
        starts = cut & ~np.concatenate([[False], cut[:-1]])  # the first token of each span
        source = np.where(starts, tokenizer.mask_token_id, ids)[starts | ~cut]
        return {"rows": [source.tolist()], "decoder_labels": ids.tolist()}

    @staticmethod
    def _token_losses(out, batch):
        """Per predicted token: (its example, its cross-entropy, whether argmax is right)."""
        if "mlm_logits" in out:  # encoders: the masked-LM head's logits at the chosen tokens
            logits, scored = out["mlm_logits"].float(), out["mlm_scored"]
            labels = batch["decoder_labels"][:, :scored.shape[1]][scored]
        else:  # encoder-decoders: the decoder's logits over the whole text
            logits, labels = out["lm_logits"].float(), batch["decoder_labels"]
            scored = labels != IGNORE
            logits, labels = logits[scored], labels[scored]
        example = torch.arange(scored.shape[0], device=scored.device)[:, None].expand_as(
            scored)[scored]
        losses = F.cross_entropy(logits, labels.long(), reduction="none")
        return example, losses, (logits.argmax(-1) == labels).float(), logits.shape[-1]

    def loss(self, out, batch, mine):
        example, losses, _, vocabulary = self._token_losses(out, batch)
        num_examples = batch["decoder_labels"].shape[0]
        total = torch.zeros(num_examples, device=losses.device).index_add(0, example, losses)
        counted = torch.bincount(example, minlength=num_examples).clamp(min=1)
        return total / counted, torch.full_like(total, float(vocabulary)).log()

    def stats(self, out, batch, mine):
        example, _, correct, _ = self._token_losses(out, batch)
        num_examples = batch["decoder_labels"].shape[0]
        right = torch.zeros(num_examples, device=correct.device).index_add(0, example, correct)
        counted = torch.bincount(example, minlength=num_examples).float()
        return torch.stack([right, counted], -1)

    def finalize(self, stats, pairs=None):
        return {"accuracy": float(stats[0] / max(stats[1], 1))}
