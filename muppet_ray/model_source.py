"""Where a fine-tuning or evaluation starts from: `--from` resolved to a model directory.

`--from` takes an export, a pre-finetuning run (its export, or else its newest intact
checkpoint), a checkpoint, a `transformers` model directory or a Hub id; checkpoints become an
export first. `baseline_source` is the backbone a pre-finetuned model started from.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from transformers import AutoConfig

from muppet_ray import checkpoint as checkpoints
from muppet_ray.config import Config, parse_config
from muppet_ray.errors import ConfigError
from muppet_ray.export import MANIFEST, write_export
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.storage import CHECKPOINT_SNAPSHOT, RunDir
from muppet_ray.tasks import HeadLayout
from muppet_ray.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Source:
    """A model to start from: a directory `transformers` loads (with the tokenizer) or a Hub id,
    and the muppet-ray manifest when it is one of our exports (None: no trained heads)."""

    given: str  # what the user named
    model: str  # for model.pretrained
    manifest: dict | None = None

    @property
    def heads_file(self) -> str:
        return os.path.join(self.model, "heads.safetensors")

    def layouts(self) -> list[HeadLayout]:
        """The tasks the source model was trained on (none for a plain model)."""
        return [HeadLayout.from_json(t) for t in (self.manifest or {}).get("tasks", [])]

    def trained_heads(self) -> dict[str, str]:
        """Head -> a task that trained it (classification heads: task -> itself)."""
        found: dict[str, str] = {}
        for layout in self.layouts():
            found.setdefault(layout.name if layout.head == "classification" else layout.head,
                             layout.name)
        return found


def resolve_source(given: str, work_dir: str) -> Source:
    """`--from`: an export, a run (its export, or else its latest checkpoint), a checkpoint, a
    model directory, or a Hub id. Checkpoints are turned into an export under `work_dir`."""
    path = os.path.expanduser(given)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST)):
            return _export_source(given, path)
        if os.path.exists(os.path.join(path, "export", MANIFEST)):
            return _export_source(given, os.path.join(path, "export"))
        registered = RunDir(path).registered_checkpoints()
        if os.path.exists(os.path.join(path, "config.yaml")) and registered:
            intact = checkpoints.newest_intact(pafs.LocalFileSystem(), path, registered)
            return _export_source(given, checkpoint_to_export(
                os.path.join(path, intact or registered[-1]), work_dir, verified=bool(intact)))
        if checkpoints.is_checkpoint(path):
            return _export_source(given, checkpoint_to_export(path, work_dir))
        if os.path.exists(os.path.join(path, "config.json")):
            return Source(given, os.path.abspath(path))
        raise ConfigError(f"--from {given!r}: not an export, run, checkpoint or model directory "
                          "(no muppet.json, export/, checkpoint_*/ or config.json in it)")
    if given.startswith(("/", ".", "~")) or given.count("/") > 1:  # a path, not a Hub id
        raise ConfigError(f"--from {given!r}: no such directory")
    try:  # a Hub id (HF_HUB_OFFLINE and HF_ENDPOINT apply)
        AutoConfig.from_pretrained(given)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"--from {given!r}: no such directory, and not a loadable Hub model "
                          f"({first})") from None
    return Source(given, given)


def _export_source(given: str, export_dir: str) -> Source:
    with open(os.path.join(export_dir, MANIFEST)) as f:
        return Source(given, os.path.abspath(export_dir), json.load(f))


def checkpoint_to_export(checkpoint_dir: str, work_dir: str, verified: bool = False) -> str:
    """A Ray Train checkpoint of a run (DeepSpeed's sharded files) as an export directory.
    `verified`: its manifests were checked already (they are not read twice)."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    run = RunDir(os.path.dirname(checkpoint_dir))
    name = os.path.basename(checkpoint_dir)
    if not (run.exists("config.yaml") and run.exists("tasks.json") and run.exists("tokenizer")):
        raise ConfigError(f"--from {checkpoint_dir!r}: a checkpoint must sit in its run "
                          "directory (next to config.yaml, tasks.json and tokenizer/)")
    if run.exists(CHECKPOINT_SNAPSHOT) and name not in run.registered_checkpoints():
        raise ConfigError(f"--from {checkpoint_dir!r}: Ray Train did not register it (written in "
                          "part, by a run that stopped while saving it?); use an earlier one")
    problem = None if verified else checkpoints.damage(pafs.LocalFileSystem(), checkpoint_dir)
    if problem:
        raise ConfigError(f"--from {checkpoint_dir!r}: the checkpoint is damaged ({problem}); "
                          "use an earlier one")
    out = RunDir(work_dir)
    if out.exists(f"from-{name}/{MANIFEST}"):
        return out.uri(f"from-{name}")
    config_yaml = run.read_text("config.yaml")
    config = parse_config(config_yaml)
    tokenizer = load_tokenizer(run.uri("tokenizer"))
    layouts = [HeadLayout.from_json(t) for t in json.loads(run.read_text("tasks.json"))]
    model = MuppetModel(build_backbone(config.model, tokenizer), layouts, config.model.dropout,
                        config.training.loss_scaling, config.model.max_target_length, tokenizer)
    try:
        state = checkpoints.weights(checkpoint_dir)
    except FileNotFoundError:
        raise ConfigError(f"--from {checkpoint_dir!r}: no DeepSpeed checkpoint in it") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # (strict, but as a one-line error)
        raise ConfigError(f"--from {checkpoint_dir!r}: the checkpoint does not match the run's "
                          f"model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return write_export(model, tokenizer, out, checkpoints.step_of(name), config_yaml,
                        relative=f"from-{name}")




def baseline_source(source: Source, work_dir: str) -> Source:
    """The backbone a pre-finetuned source started from: its `model.pretrained`, or (for a
    backbone built from scratch) the same seeded initial weights, saved under `work_dir`."""
    if source.manifest is None:
        raise ConfigError(f"--baseline auto: {source.given!r} is not a muppet-ray export, so "
                          "its starting backbone is unknown; name it (--baseline MODEL)")
    config = parse_config(source.manifest["config"])
    if config.model.pretrained is not None:
        return resolve_source(config.model.pretrained, work_dir)
    init = initial_weights(config, load_tokenizer(source.model), work_dir)
    return Source(f"{source.given} (initial weights)", init)


def initial_weights(config: Config, tokenizer, work_dir: str) -> str:
    """A backbone built from scratch as a run with `config` starts it (same seed, same
    weights), saved with its tokenizer as `<work_dir>/baseline-init`."""
    out = RunDir(work_dir)
    if not out.exists("baseline-init/config.json"):
        torch.manual_seed(config.training.seed)  # as the run's workers do (train.py)
        backbone = build_backbone(config.model, tokenizer)
        with tempfile.TemporaryDirectory(prefix="muppet-init-") as local:
            backbone.save_pretrained(local)
            tokenizer.save_pretrained(local)
            out.upload(local, "baseline-init")
    return out.uri("baseline-init")
