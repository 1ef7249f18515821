"""The backbone and the heads of pre-finetuning, and how one micro-batch becomes one loss.

Heads (paper §3.1): one classification head per classification task, one multiple-choice head
shared by all multiple-choice tasks, one span head shared by all reading-comprehension tasks, and
the encoder-decoder's own LM head for generation.

Every head runs on every micro-batch, in a fixed order, and each example's loss is read from its
own task type's head; the rest get weight zero. This is what makes heterogeneous batches safe
under DeepSpeed: gradient buckets (ZeRO-1/2) and parameter gathers (ZeRO-3) are collectives, so
every worker must use the same parameters in the same order at every micro-step, whatever task
it holds. The heads are small next to the backbone, so running them all costs little.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    RobertaConfig,
    RobertaModel,
)

from muppet_ray import packing
from muppet_ray.config import ModelConfig
from muppet_ray.errors import ConfigError
from muppet_ray.storage import local_copy
from muppet_ray.task_types import HEADS, IGNORE, TASK_TYPES
from muppet_ray.task_types.classification import ClassificationHeads
from muppet_ray.task_types.denoising import MaskedLMHead
from muppet_ray.task_types.multiple_choice import MultipleChoiceHead
from muppet_ray.task_types.span import SpanHead
from muppet_ray.tasks import HeadLayout


def is_encoder_decoder(config: ModelConfig) -> bool:
    if config.pretrained is None:
        return config.arch == "bart"
    try:
        return bool(AutoConfig.from_pretrained(local_copy(config.pretrained)).is_encoder_decoder)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ConfigError(f"model.pretrained: cannot load {config.pretrained!r} ({first})"
                          ) from None


# Models whose position ids start after the padding index: 2 of their positions are unusable.
OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def check_positions(config: ModelConfig) -> None:
    """model.max_length must fit the pretrained model's position embeddings (beyond them its
    inputs would index past the table, or be cut unannounced)."""
    if config.pretrained is None:
        return  # (built to fit)
    try:
        pretrained = AutoConfig.from_pretrained(local_copy(config.pretrained))
    except (OSError, ValueError):
        return  # (reported where the model is loaded)
    positions = getattr(pretrained, "max_position_embeddings", None)
    if positions is None:
        return
    usable = positions - OFFSET_POSITIONS.get(pretrained.model_type, 0)
    if config.max_length > usable:
        raise ConfigError(f"model.max_length: {config.max_length} is more than "
                          f"{config.pretrained!r} takes ({usable} positions)")


def build_backbone(config: ModelConfig, tokenizer) -> nn.Module:
    """A pretrained backbone (Hub id, directory or URI), or a small one built from `config`,
    set up for `config.attention`."""
    backbone = _backbone(config, tokenizer)
    if config.attention == "packed":
        packing.use_packed_attention(backbone)
    return backbone


def _backbone(config: ModelConfig, tokenizer) -> nn.Module:
    if config.pretrained is not None:
        if is_encoder_decoder(config):
            return AutoModelForSeq2SeqLM.from_pretrained(local_copy(config.pretrained))
        return load_encoder(local_copy(config.pretrained))
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    size = dict(vocab_size=len(tokenizer), max_position_embeddings=config.max_length + 2)
    if config.arch == "bart":
        return BartForConditionalGeneration(BartConfig(
            **size, **ids, d_model=config.hidden_size, encoder_layers=config.num_layers,
            decoder_layers=config.num_layers, encoder_attention_heads=config.num_heads,
            decoder_attention_heads=config.num_heads, encoder_ffn_dim=config.ffn_size,
            decoder_ffn_dim=config.ffn_size, dropout=config.dropout,
            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None,
        ))
    encoder_config = dict(
        **size, **ids, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_size,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
    )
    if config.arch == "roberta":
        return RobertaModel(RobertaConfig(**encoder_config, type_vocab_size=1),
                            add_pooling_layer=False)
    return BertModel(BertConfig(**encoder_config), add_pooling_layer=False)


def load_encoder(path: str) -> nn.Module:
    try:  # the pooler is unused (heads pool the first token): leave it out
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(path)


def hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    return getattr(config, "d_model", None) or config.hidden_size


class MuppetModel(nn.Module):
    """Backbone + heads for a fixed list of tasks (their head layouts, in the run's order)."""

    def __init__(self, backbone: nn.Module, layouts: list[HeadLayout], dropout: float,
                 loss_scaling: bool = True, max_target_length: int = 32, tokenizer=None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer  # to score generated text
        self.layouts = layouts
        self.loss_scaling = loss_scaling
        self.max_target_length = max_target_length
        self.encoder_decoder = bool(backbone.config.is_encoder_decoder)
        self.uses_token_types = getattr(backbone.config, "type_vocab_size", 0) > 1
        width = hidden_size(backbone)
        heads = {layout.head for layout in layouts}
        if "generation" in heads and not self.encoder_decoder:
            raise ConfigError("generation tasks need an encoder-decoder backbone (e.g. BART); "
                              f"{type(backbone).__name__} is encoder-only")
        class_tasks = [t for t in layouts if t.head == "classification"]
        modules = {}
        if class_tasks:
            modules["classification"] = ClassificationHeads(
                width, [t.num_outputs for t in class_tasks], dropout)
        if "multiple_choice" in heads:
            modules["multiple_choice"] = MultipleChoiceHead(width, dropout)
        if "span" in heads:
            modules["span"] = SpanHead(width)
        if "denoising" in heads and not self.encoder_decoder:  # (else: the decoder's LM head)
            modules["denoising"] = MaskedLMHead(
                backbone.get_input_embeddings(), getattr(backbone.config, "layer_norm_eps", 1e-12))
        self.heads = nn.ModuleDict(modules)
        # The heads that run on every micro-batch, in order (the decoder runs whenever there is
        # one, so that its parameters are used identically on every worker).
        self.active_heads = [h for h in HEADS if h in modules or (self.encoder_decoder and (
            h == "generation" or (h == "denoising" and h in heads)))]
        self.active_types = [name for name, t in TASK_TYPES.items() if t.head in self.active_heads]
        head_index = {t.name: i for i, t in enumerate(class_tasks)}
        self.register_buffer("task_type", torch.tensor(
            [self.active_types.index(t.type) for t in layouts]), persistent=False)
        self.register_buffer("task_head_index", torch.tensor(
            [head_index.get(t.name, 0) for t in layouts]), persistent=False)
        self.register_buffer("task_num_outputs", torch.tensor(
            [max(1, t.num_outputs) for t in layouts]), persistent=False)
        self.kept_pairs: dict[int, list[torch.Tensor]] = {}  # (see take_pairs)

    # ------------------------------------------------------------------ forward

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.uses_token_types and "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        encoder = self.backbone.get_encoder() if self.encoder_decoder else self.backbone
        if packing.is_packed(self.backbone):
            return packing.encode(encoder, inputs)
        return encoder(**inputs).last_hidden_state

    def head_outputs(self, batch, hidden) -> dict[str, torch.Tensor]:
        first = batch["first_row"]
        out = {}
        if "classification" in self.heads:
            out["class_logits"] = self.heads["classification"](
                hidden[first, 0], batch["head_index"])
        if "multiple_choice" in self.heads:
            out["choice_scores"] = self.heads["multiple_choice"](hidden[:, 0])
        if "span" in self.heads:
            out["span_logits"] = self.heads["span"](hidden[first])
        if "denoising" in self.heads:  # (the vocabulary's logits at the chosen tokens only)
            labels, tokens = batch["decoder_labels"], hidden[first]
            width = min(labels.shape[1], tokens.shape[1])
            out["mlm_scored"] = labels[:, :width] != IGNORE
            out["mlm_logits"] = self.heads["denoising"](tokens[:, :width][out["mlm_scored"]])
        if self.encoder_decoder:
            labels = batch["decoder_labels"]
            decoder_input = self._shift_right(labels)
            out["lm_logits"] = self.backbone(
                encoder_outputs=(hidden[first],), attention_mask=batch["attention_mask"][first],
                decoder_input_ids=decoder_input, use_cache=False,
            ).logits
        return out

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        config = self.backbone.config
        shifted = labels.new_full(labels.shape, config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE, config.pad_token_id)
        shifted[:, 0] = config.decoder_start_token_id
        return shifted

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add what the heads and losses need, looked up from each example's task."""
        task = batch["example_task"]
        rows = torch.arange(len(batch["row_example"]), device=task.device)
        first_row = torch.full_like(task, len(rows)).scatter_reduce(
            0, batch["row_example"], rows, "amin")
        return {
            **batch,
            "first_row": first_row,
            "first_row_mask": batch["attention_mask"][first_row].bool(),
            "head_index": self.task_head_index[task],
            "num_outputs": self.task_num_outputs[task],
            "type": self.task_type[task],
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training pass: the micro-batch's loss, and each task's summed loss and examples."""
        batch = self.prepare(batch)
        out = self.head_outputs(batch, self.encode(batch))
        loss = torch.zeros_like(batch["target"])
        log_n = torch.ones_like(loss)
        for type_id, name in enumerate(self.active_types):
            mine = batch["type"] == type_id
            type_loss, type_log_n = TASK_TYPES[name].loss(out, batch, mine)
            loss = torch.where(mine, type_loss, loss)
            log_n = torch.where(mine, type_log_n, log_n)
        # Muppet §3.2: divide by log(n) so tasks with large output spaces don't dominate.
        scaled = loss / log_n
        objective = (scaled if self.loss_scaling else loss).mean()
        num_tasks = len(self.layouts)
        task = batch["example_task"]

        def per_task(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(num_tasks, device=loss.device).index_add(0, task, values.detach())

        return {
            "loss": objective,
            "task_loss_sum": per_task(loss),
            "task_scaled_loss_sum": per_task(scaled),  # (what online mixing compares)
            "task_examples": torch.bincount(task, minlength=num_tasks).float(),
        }

    # --------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluation pass: per-task metric statistics [num_tasks, max_stats], to be summed
        over batches and workers (regression's pairs kept aside, see take_pairs)."""
        batch = self.prepare(batch)
        out = self.head_outputs(batch, self.encode(batch))
        if self.encoder_decoder:
            generation = self.active_types.index("generation")
            if bool((batch["type"] == generation).any()):
                out["generated"] = self.generate(batch)
            else:
                out["generated"] = torch.zeros_like(batch["decoder_labels"])
            out["tokenizer"] = self.tokenizer
        width = max(TASK_TYPES[t].num_stats for t in self.active_types)
        stats = torch.zeros(len(self.layouts), width, device=batch["target"].device)
        for type_id, name in enumerate(self.active_types):
            mine = batch["type"] == type_id
            if not bool(mine.any()):
                continue
            values = TASK_TYPES[name].stats(out, batch, mine)[mine]
            stats[:, : values.shape[1]].index_add_(0, batch["example_task"][mine], values)
            if TASK_TYPES[name].keeps_pairs:
                pairs = TASK_TYPES[name].pairs(out, batch, mine).cpu()
                for task in batch["example_task"][mine].unique().tolist():
                    self.kept_pairs.setdefault(task, []).append(
                        pairs[batch["example_task"][mine].cpu() == task])
        return stats

    def take_pairs(self) -> dict[int, np.ndarray]:
        """Task -> the (prediction, target) pairs of the evaluation passes since the last call,
        for task types whose metrics need every pair (regression's Spearman)."""
        kept, self.kept_pairs = self.kept_pairs, {}
        return {task: torch.cat(parts).double().numpy() for task, parts in kept.items()}

    def generate(self, batch) -> torch.Tensor:
        first = batch["first_row"]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.backbone.generate(
            input_ids=batch["input_ids"][first], attention_mask=batch["attention_mask"][first],
            max_new_tokens=self.max_target_length, num_beams=1, do_sample=False,
            # Under ZeRO-3 every worker must keep running forward passes until all are done.
            synced_gpus=distributed and torch.distributed.get_world_size() > 1,
        )
