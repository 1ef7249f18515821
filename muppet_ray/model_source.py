"""Where a fine-tuning or evaluation starts from: `--from` resolved to a model directory.

`--from` takes an export, a pre-finetuning run (its export, or else its newest intact
checkpoint), a checkpoint, a `transformers` model directory (each at a local path or a URI) or
a Hub id; checkpoints become an export first. A source at a URI stays one: each node that loads
it copies it into its own cache (storage.local_copy). `baseline_source` is the backbone a
pre-finetuned model started from.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from muppet_ray import checkpoint as checkpoints
from muppet_ray.config import Config, parse_config
from muppet_ray.errors import ConfigError
from muppet_ray.export import MANIFEST, write_export
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.storage import CHECKPOINT_SNAPSHOT, RunDir, is_uri, local_copy, normalize
from muppet_ray.tasks import HeadLayout
from muppet_ray.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Source:
    """A model to start from: a directory `transformers` loads (with the tokenizer) or a Hub id,
    and the muppet-ray manifest when it is one of our exports (None: no trained heads)."""

    given: str  # what the user named
    model: str  # for model.pretrained: a Hub id, a local directory or a URI
    manifest: dict | None = None

    def heads_file(self) -> str:
        """The trained heads, as a local file (a stored export is copied to this node first)."""
        return os.path.join(local_copy(self.model), "heads.safetensors")

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
    model directory (each a local path or a URI), or a Hub id. Checkpoints are turned into an
    export under `work_dir`."""
    local = os.path.expanduser(given)
    if is_uri(given) or os.path.isdir(local):
        where = RunDir(given)
        if where.exists(MANIFEST):
            return _export_source(given, where)
        if where.exists(f"export/{MANIFEST}"):
            return _export_source(given, RunDir(where.uri("export")))
        registered = where.registered_checkpoints()
        if where.exists("config.yaml") and registered:
            intact = checkpoints.newest_intact(where.fs, where.path, registered)
            return _export_source(given, checkpoint_to_export(
                where.uri(intact or registered[-1]), work_dir, verified=bool(intact)))
        if where.exists(checkpoints.TAG):
            return _export_source(given, checkpoint_to_export(where.root, work_dir))
        if where.exists("config.json"):
            return Source(given, where.root)
        if is_uri(given) and not where.exists():
            raise ConfigError(f"--from {given!r}: nothing is stored there")
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


def _export_source(given: str, export: RunDir) -> Source:
    return Source(given, export.root, json.loads(export.read_text(MANIFEST)))


def checkpoint_to_export(checkpoint: str, work_dir: str, verified: bool = False) -> RunDir:
    """A Ray Train checkpoint of a run (DeepSpeed's sharded files, at a path or URI) as an
    export under `work_dir`. `verified`: its manifests were checked already (not read twice)."""
    checkpoint = normalize(checkpoint)
    parent, name = checkpoint.rsplit("/", 1)
    run = RunDir(parent)
    if not (run.exists("config.yaml") and run.exists("tasks.json") and run.exists("tokenizer")):
        raise ConfigError(f"--from {checkpoint!r}: a checkpoint must sit in its run "
                          "directory (next to config.yaml, tasks.json and tokenizer/)")
    if run.exists(CHECKPOINT_SNAPSHOT) and name not in run.registered_checkpoints():
        raise ConfigError(f"--from {checkpoint!r}: Ray Train did not register it (written in "
                          "part, by a run that stopped while saving it?); use an earlier one")
    problem = None if verified else checkpoints.damage(run.fs, f"{run.path}/{name}")
    if problem:
        raise ConfigError(f"--from {checkpoint!r}: the checkpoint is damaged ({problem}); "
                          "use an earlier one")
    out = RunDir(work_dir)
    if out.exists(f"from-{name}/{MANIFEST}"):
        return RunDir(out.uri(f"from-{name}"))
    config_yaml = run.read_text("config.yaml")
    config = parse_config(config_yaml)
    tokenizer = load_tokenizer(run.uri("tokenizer"))
    layouts = [HeadLayout.from_json(t) for t in json.loads(run.read_text("tasks.json"))]
    model = MuppetModel(build_backbone(config.model, tokenizer), layouts, config.model.dropout,
                        config.training.loss_scaling, config.model.max_target_length, tokenizer)
    with tempfile.TemporaryDirectory(prefix="muppet-checkpoint-") as local:
        try:
            run.download(f"{name}/{checkpoints.TAG}", f"{local}/{checkpoints.TAG}")
            state = checkpoints.weights(local)
        except FileNotFoundError:
            raise ConfigError(f"--from {checkpoint!r}: no DeepSpeed checkpoint in it") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # (strict, but as a one-line error)
        raise ConfigError(f"--from {checkpoint!r}: the checkpoint does not match the run's "
                          f"model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return RunDir(write_export(model, tokenizer, out, checkpoints.step_of(name), config_yaml,
                               relative=f"from-{name}"))


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
