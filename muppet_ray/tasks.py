"""A task = name, task type, label space, data source (sources.py); and the run's task list.

Canonical fields per task type are listed in each task type's `required_fields`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from muppet_ray import suite
from muppet_ray.catalog import catalog, families
from muppet_ray.config import Config, TaskSpec
from muppet_ray.errors import ConfigError, DataError
from muppet_ray.sources import (
    BuiltinSource,
    FileSource,
    _text,
    bigbench_kind,
    hub_path,
    read_small_file,
)
from muppet_ray.task_types import TASK_TYPES, TaskType


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    source: Any = field(compare=False)
    labels: tuple[str, ...] = ()
    downstream: bool = False
    skip_bad_rows: bool = False
    # denoising: (style "mlm" or "spans", noise_density, mean_span); out of the repr (the
    # chunk cache's key adds it where set: data._fingerprint)
    noise: tuple | None = field(default=None, repr=False)

    @property
    def task_type(self) -> TaskType:
        return TASK_TYPES[self.type]

    @property
    def num_outputs(self) -> int:
        """Outputs of its classification head (0 for types served by shared heads)."""
        return {"classification": len(self.labels), "regression": 1}.get(self.type, 0)

    def layout(self) -> HeadLayout:
        return HeadLayout(self.name, self.type, self.num_outputs, self.labels)


@dataclass(frozen=True)
class HeadLayout:
    """What the model, its checkpoints and its export know of a task: the head that serves it
    and its outputs there (no data source: a model is rebuilt from these alone)."""

    name: str
    type: str
    num_outputs: int  # of its own classification head (0 for types served by a shared head)
    labels: tuple[str, ...] = ()

    @property
    def head(self) -> str:
        return TASK_TYPES[self.type].head

    def to_json(self) -> dict[str, Any]:  # (tasks.json and the export manifest)
        return {"name": self.name, "type": self.type, "num_outputs": self.num_outputs,
                "labels": list(self.labels)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> HeadLayout:
        return cls(raw["name"], raw["type"], raw["num_outputs"], tuple(raw["labels"]))


def builtin_task(name: str, config: Config) -> Task:
    spec = suite.SUITE[name]
    source = BuiltinSource(name, config.tasks.data_seed, config.tasks.suite_scale)
    return Task(name, spec.type, source, spec.labels, spec.downstream)


def custom_task(spec: TaskSpec, config: Config) -> Task:
    kind, labels = spec.type, tuple(spec.labels or ())
    if spec.format == "bigbench":
        found, found_labels = _inspect_bigbench(spec)
        if kind not in (None, found):
            raise ConfigError(f"task {spec.name!r}: type {kind!r}, but {spec.train!r} is a "
                              f"{found} task")
        kind, labels = found, labels or found_labels
    task_type = TASK_TYPES[kind]
    known = task_type.required_fields + task_type.optional_fields
    unknown = sorted(set(spec.fields) - set(known))
    if unknown:
        raise ConfigError(f"task {spec.name!r}: fields {unknown} are not fields of {kind} "
                          f"tasks; they have {list(known)}")
    train, validation = spec.train, spec.validation
    if spec.hub is not None:
        mirror = config.tasks.hub_mirror
        train = hub_path(spec.hub, spec.hub_config, spec.train, mirror)
        validation = spec.validation and hub_path(spec.hub, spec.hub_config, spec.validation,
                                                  mirror)
    held_out = (0 if validation else spec.validation_fraction) + config.tasks.test_fraction
    if held_out >= 1:
        raise ConfigError(f"task {spec.name!r}: validation_fraction {spec.validation_fraction} "
                          f"+ tasks.test_fraction {config.tasks.test_fraction} leave no "
                          "training rows (expected a sum below 1)")
    source = FileSource(spec.name, train, validation, spec.validation_fraction, spec.format,
                        dict(spec.fields), config.tasks.data_seed, dict(spec.label_map),
                        spec.decode_errors, test_fraction=config.tasks.test_fraction)
    skip = config.tasks.skip_bad_rows if spec.skip_bad_rows is None else spec.skip_bad_rows
    noise = None
    if kind == "denoising":  # (how depends on the backbone: masked tokens, or cut-out spans)
        from muppet_ray.model import is_encoder_decoder

        style = "spans" if is_encoder_decoder(config.model) else "mlm"
        if style == "mlm" and "mean_span" in spec.noise_settings():
            raise ConfigError(f"task {spec.name!r}: mean_span is for an encoder-decoder's spans; "
                              "on an encoder, masked tokens are chosen one by one (remove it)")
        noise = (style, spec.noise_density, spec.mean_span)
    return Task(spec.name, kind, source, labels, skip_bad_rows=skip, noise=noise)


def _inspect_bigbench(spec: TaskSpec) -> tuple[str, tuple[str, ...]]:
    try:
        document = json.loads(_text(read_small_file(spec.train), spec.train,
                                    errors=spec.decode_errors))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"task {spec.name!r}: cannot read BIG-bench task {spec.train!r} "
                        f"({e})") from None
    except DataError as e:
        raise DataError(f"task {spec.name!r}, {e}") from None
    kind, labels = bigbench_kind(document)
    if kind == "unknown":
        raise DataError(f"task {spec.name!r}: {spec.train!r} has neither `target_scores` nor "
                        f"`target` in every example")
    return kind, labels


def resolve_tasks(config: Config) -> list[Task]:
    """The tasks of the run, in a fixed order: the order of `tasks.include` (a family stands for
    its catalog tasks, in catalog order), or the suite's default mixture then the custom tasks.
    A name is looked up among custom tasks, then the catalog, then the built-in suite."""
    custom = {spec.name: spec for spec in config.tasks.custom}
    clash = sorted(set(custom) & set(suite.SUITE))
    if clash:
        raise ConfigError(f"tasks.custom: {clash} clash with built-in task names")
    entries, groups = catalog(), families()
    names: list[str] = []
    also = config.tasks.also
    default = suite.DEFAULT_MIXTURE + [n for n in custom if n not in also]
    for item in [*(config.tasks.include or default), *also]:
        if item in custom or item in entries or item in suite.SUITE:
            names.append(item)
        elif item in groups:
            names += groups[item]
        else:
            raise ConfigError(
                f"tasks.{'also' if item in also else 'include'}: unknown task or family "
                f"{item!r}; see `muppet-ray tasks list` "
                f"(families: {sorted(groups)}; built-in tasks: {sorted(suite.SUITE)}"
                + (f"; custom tasks: {sorted(custom)})" if custom else ")"))
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"tasks.include{', tasks.also' if also else ''}: tasks listed twice: "
                          f"{repeated}")
    tasks = [custom_task(custom[n], config) if n in custom
             else custom_task(entries[n].spec, config) if n in entries
             else builtin_task(n, config) for n in names]
    if config.mixture.rule == "explicit":
        missing = [t.name for t in tasks if t.name not in config.mixture.weights]
        extra = sorted(set(config.mixture.weights) - set(names))
        if missing or extra:
            raise ConfigError(f"mixture.weights: needs exactly the run's tasks; missing "
                              f"{missing}, not in the run {extra}")
    return tasks

