"""The exported model: `<run>/export/`, loadable without muppet-ray.

    config.json, model.safetensors   the backbone, Hugging Face format (`AutoModel` loads it)
    tokenizer files                   `AutoTokenizer` loads them
    heads.safetensors                 the classification, multiple-choice and span heads
    muppet.json                       manifest: tasks, types, label spaces, metrics, head layout

The paper's public release dropped the heads and noted that fine-tuning suffers for it; ours
keeps them.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from muppet_ray.model import MuppetModel
from muppet_ray.storage import RunDir
from muppet_ray.task_types import TASK_TYPES

MANIFEST = "muppet.json"


def manifest(model: MuppetModel, step: int, config_yaml: str) -> dict:
    return {
        "format": 1,
        "step": step,
        "encoder_decoder": model.encoder_decoder,
        "backbone": type(model.backbone).__name__,
        "tasks": [
            {**spec, "metric": TASK_TYPES[spec["type"]].metric,
             "head": TASK_TYPES[spec["type"]].head}
            for spec in model.task_specs
        ],
        "loss_scaling": model.loss_scaling,
        "max_target_length": model.max_target_length,
        "config": config_yaml,
    }


def write_export(model: MuppetModel, tokenizer, run_dir: RunDir, step: int, config_yaml: str,
                 relative: str = "export") -> str:
    """Write the export (call on one worker, with the full parameters in hand)."""
    with tempfile.TemporaryDirectory(prefix="muppet-export-") as local:
        model.backbone.save_pretrained(local)
        tokenizer.save_pretrained(local)
        heads = {k: v.detach().cpu().float().contiguous() for k, v in
                 model.heads.state_dict().items()}
        save_file(heads, os.path.join(local, "heads.safetensors"))
        with open(os.path.join(local, MANIFEST), "w") as f:
            json.dump(manifest(model, step, config_yaml), f, indent=2)
        run_dir.upload(local, relative)
    return run_dir.uri(relative)


def load_exported(export_dir: str, dropout: float = 0.1) -> tuple[MuppetModel, object, dict]:
    """(model with its trained heads, tokenizer, manifest) from a local export directory."""
    with open(os.path.join(export_dir, MANIFEST)) as f:
        info = json.load(f)
    loader = AutoModelForSeq2SeqLM if info["encoder_decoder"] else AutoModel
    backbone = loader.from_pretrained(export_dir)
    specs = [{k: t[k] for k in ("name", "type", "num_outputs", "labels")} for t in info["tasks"]]
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = MuppetModel(backbone, specs, dropout, info["loss_scaling"], info["max_target_length"],
                        tokenizer)
    heads = load_file(os.path.join(export_dir, "heads.safetensors"))
    model.heads.load_state_dict({k: v.to(torch.float32) for k, v in heads.items()})
    return model, tokenizer, info
