"""The exported model: `<run>/export/`, loadable without muppet-ray.

    config.json, model.safetensors   the backbone, Hugging Face format (`AutoModel` loads it)
    tokenizer files                   `AutoTokenizer` loads them
    heads.safetensors                 the classification, multiple-choice and span heads
    muppet.json                       manifest: tasks, types, label spaces, metrics, head layout

The paper's public release dropped the heads and noted that fine-tuning suffers for it; ours
keeps them. `to_transformers` also writes one task as a plain `transformers` task model
(`AutoModelForSequenceClassification`, `...ForMultipleChoice`, `...ForQuestionAnswering`) with
its trained head in place, for encoders whose head layout ours matches (BERT, RoBERTa).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from muppet_ray.errors import ConfigError
from muppet_ray.model import MuppetModel, load_encoder
from muppet_ray.storage import RunDir, is_uri
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import HeadLayout

MANIFEST = "muppet.json"


def manifest(model: MuppetModel, step: int, config_yaml: str) -> dict:
    return {
        "format": 1,
        "step": step,
        "encoder_decoder": model.encoder_decoder,
        "backbone": type(model.backbone).__name__,
        "tasks": [
            {**layout.to_json(), "metric": TASK_TYPES[layout.type].metric, "head": layout.head}
            for layout in model.layouts
        ],
        "loss_scaling": model.loss_scaling,
        "max_target_length": model.max_target_length,
        "config": config_yaml,
    }


def export_from_engine(engine, rank: int, tokenizer, run_dir: RunDir, step: int,
                       config_yaml: str) -> str | None:
    """Write the export of a DeepSpeed engine's model from worker 0 (a collective call: under
    ZeRO-3 every worker holds a shard of each parameter, which are gathered; a no-op otherwise).
    Returns its URI on worker 0."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            return write_export(module, tokenizer, run_dir, step, config_yaml)
    return None


def write_export(model: MuppetModel, tokenizer, run_dir: RunDir, step: int, config_yaml: str,
                 relative: str = "export") -> str:
    """Write the export (call on one worker, with the full parameters in hand)."""
    with run_dir.staged(relative, last=MANIFEST) as local:
        model.backbone.save_pretrained(local)
        tokenizer.save_pretrained(local)
        heads = {k: v.detach().cpu().float().contiguous() for k, v in
                 model.heads.state_dict().items()}
        save_file(heads, os.path.join(local, "heads.safetensors"))
        with open(os.path.join(local, MANIFEST), "w") as f:
            json.dump(manifest(model, step, config_yaml), f, indent=2)
    return run_dir.uri(relative)


def load_exported(export_dir: str, dropout: float = 0.1) -> tuple[MuppetModel, object, dict]:
    """(model with its trained heads, tokenizer, manifest) from a local export directory."""
    with open(os.path.join(export_dir, MANIFEST)) as f:
        info = json.load(f)
    if info["encoder_decoder"]:
        backbone = AutoModelForSeq2SeqLM.from_pretrained(export_dir)
    else:
        backbone = load_encoder(export_dir)
    layouts = [HeadLayout.from_json(t) for t in info["tasks"]]
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = MuppetModel(backbone, layouts, dropout, info["loss_scaling"], info["max_target_length"],
                        tokenizer)
    heads = load_file(os.path.join(export_dir, "heads.safetensors"))
    model.heads.load_state_dict({k: v.to(torch.float32) for k, v in heads.items()})
    return model, tokenizer, info


# Task type -> the transformers Auto class whose head ours maps onto.
AUTO_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "multiple_choice": AutoModelForMultipleChoice,
    "span": AutoModelForQuestionAnswering,
}
# Encoders whose task heads are dense + tanh + projection on the first token (BERT puts the
# dense layer in its pooler, RoBERTa in its classification head), as ours are.
MAPPABLE_BACKBONES = ("bert", "roberta", "xlm-roberta")


def to_transformers(export_dir: str, task: str, out_dir: str) -> str:
    """Write `task` of an export as a `transformers` task model into `out_dir` (each a local
    path or a URI; other files there are kept, as `save_pretrained` keeps them); returns the
    model's class name. Nothing is written before the model is built."""
    with tempfile.TemporaryDirectory(prefix="muppet-export-in-") as local:
        if is_uri(export_dir):  # (a one-off read: not kept in the node's model cache)
            RunDir(export_dir).download("", local)
            export_dir = local
        return _to_transformers(export_dir, task, out_dir)


def _to_transformers(export_dir: str, task: str, out_dir: str) -> str:
    model, tokenizer, _ = load_exported(export_dir)
    layout = next((t for t in model.layouts if t.name == task), None)
    if layout is None:
        raise ConfigError(f"task {task!r} is not in the export {export_dir!r}; it has "
                          f"{[t.name for t in model.layouts]}")
    model_type = model.backbone.config.model_type
    if layout.type not in AUTO_CLASSES or model_type not in MAPPABLE_BACKBONES:
        raise ConfigError(
            f"task {task!r}: no transformers task model matches a {layout.type} head on a "
            f"{model_type} backbone (supported: {sorted(AUTO_CLASSES)} tasks on "
            f"{list(MAPPABLE_BACKBONES)} encoders)")
    config = model.backbone.config.__class__.from_dict(model.backbone.config.to_dict())
    if layout.head == "classification":
        config.num_labels = layout.num_outputs
        config.problem_type = ("regression" if layout.type == "regression"
                               else "single_label_classification")
        if layout.labels:
            config.id2label = dict(enumerate(layout.labels))
            config.label2id = {label: i for i, label in enumerate(layout.labels)}
    hf = AUTO_CLASSES[layout.type].from_config(config)
    weights = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = hf.base_model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"backbone weights do not fit {type(hf).__name__}: missing "
                           f"{missing}, unexpected {unexpected}")
    dense, projection = _head_weights(model, layout)
    roberta_classifier = layout.head == "classification" and model_type != "bert"
    with torch.no_grad():
        if layout.head == "span":
            hf.qa_outputs.load_state_dict(projection.state_dict())
        elif roberta_classifier:
            hf.classifier.dense.load_state_dict(dense.state_dict())
            hf.classifier.out_proj.load_state_dict(projection.state_dict())
        else:  # BERT (any head), RoBERTa multiple choice: dense + tanh is the pooler
            hf.base_model.pooler.dense.load_state_dict(dense.state_dict())
            hf.classifier.load_state_dict(projection.state_dict())
    with tempfile.TemporaryDirectory(prefix="muppet-task-model-") as local:
        hf.save_pretrained(local)
        tokenizer.save_pretrained(local)
        RunDir(out_dir).upload(local, "", replace=False)
    return type(hf).__name__


def _head_weights(model: MuppetModel, layout: HeadLayout
                  ) -> tuple[torch.nn.Linear | None, torch.nn.Linear]:
    """The task's head as (dense, projection) linear layers (no dense layer for span)."""
    if layout.head == "span":
        return None, model.heads["span"].proj
    if layout.head == "multiple_choice":
        head = model.heads["multiple_choice"]
        return head.dense, head.score
    heads = model.heads["classification"]
    index = [t for t in model.layouts if t.head == "classification"].index(layout)
    n = layout.num_outputs
    hidden = heads.dense_weight.shape[1]
    dense, projection = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, n)
    with torch.no_grad():  # ours compute x @ W; nn.Linear stores W transposed
        dense.weight.copy_(heads.dense_weight[index].T)
        dense.bias.copy_(heads.dense_bias[index])
        projection.weight.copy_(heads.out_weight[index][:, :n].T)
        projection.bias.copy_(heads.out_bias[index][:n])
    return dense, projection
