"""A task = name, task type, label space, data source (sources.py); and the run's task list.

Canonical fields per task type are listed in each task type's `required_fields`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from muppet_ray import suite
from muppet_ray.config import Config, TaskSpec
from muppet_ray.errors import ConfigError, DataError
from muppet_ray.sources import BuiltinSource, FileSource, bigbench_kind, read_small_file
from muppet_ray.task_types import TASK_TYPES, TaskType


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    source: Any = field(compare=False)
    labels: tuple[str, ...] = ()
    downstream: bool = False

    @property
    def task_type(self) -> TaskType:
        return TASK_TYPES[self.type]

    @property
    def num_outputs(self) -> int:
        """Outputs of its classification head (0 for types served by shared heads)."""
        return {"classification": len(self.labels), "regression": 1}.get(self.type, 0)

    def spec(self) -> dict[str, Any]:
        """What the model and the export manifest need to know of the task."""
        return {"name": self.name, "type": self.type, "num_outputs": self.num_outputs,
                "labels": list(self.labels)}


def builtin_task(name: str, config: Config) -> Task:
    spec = suite.SUITE[name]
    source = BuiltinSource(name, config.training.seed, config.tasks.suite_scale)
    return Task(name, spec.type, source, spec.labels, spec.downstream)


def custom_task(spec: TaskSpec, config: Config) -> Task:
    kind, labels = spec.type, tuple(spec.labels or ())
    if spec.format == "bigbench":
        found, found_labels = _inspect_bigbench(spec)
        if kind not in (None, found):
            raise ConfigError(f"tasks.custom ({spec.name}).type: {kind!r}, but {spec.train!r} "
                              f"is a {found} task")
        kind, labels = found, labels or found_labels
    task_type = TASK_TYPES[kind]
    known = task_type.required_fields + task_type.optional_fields
    unknown = sorted(set(spec.fields) - set(known))
    if unknown:
        raise ConfigError(f"tasks.custom ({spec.name}).fields: {unknown} are not fields of "
                          f"{kind} tasks; they have {list(known)}")
    source = FileSource(spec.name, spec.train, spec.validation, spec.validation_fraction,
                        spec.format, dict(spec.fields), config.training.seed)
    return Task(spec.name, kind, source, labels)


def _inspect_bigbench(spec: TaskSpec) -> tuple[str, tuple[str, ...]]:
    try:
        document = json.loads(read_small_file(spec.train))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"task {spec.name!r}: cannot read BIG-bench task {spec.train!r} "
                        f"({e})") from None
    kind, labels = bigbench_kind(document)
    if kind == "unknown":
        raise DataError(f"task {spec.name!r}: {spec.train!r} has neither `target_scores` nor "
                        f"`target` in every example")
    return kind, labels


def resolve_tasks(config: Config) -> list[Task]:
    """The tasks of the run, in a fixed order: the order of `tasks.include`, or the suite's
    default mixture followed by the custom tasks."""
    custom = {spec.name: spec for spec in config.tasks.custom}
    clash = sorted(set(custom) & set(suite.SUITE))
    if clash:
        raise ConfigError(f"tasks.custom: {clash} clash with built-in task names")
    names = config.tasks.include or suite.DEFAULT_MIXTURE + list(custom)
    unknown = [n for n in names if n not in custom and n not in suite.SUITE]
    if unknown:
        raise ConfigError(
            f"tasks.include: unknown task {unknown[0]!r}; built-in tasks are "
            f"{sorted(suite.SUITE)}" + (f", custom tasks {sorted(custom)}" if custom else "")
        )
    if len(set(names)) != len(names):
        raise ConfigError("tasks.include: a task is listed twice")
    tasks = [custom_task(custom[n], config) if n in custom else builtin_task(n, config)
             for n in names]
    if config.mixture.rule == "explicit":
        missing = [t.name for t in tasks if t.name not in config.mixture.weights]
        extra = sorted(set(config.mixture.weights) - set(names))
        if missing or extra:
            raise ConfigError(f"mixture.weights: needs exactly the run's tasks; missing "
                              f"{missing}, not in the run {extra}")
    return tasks

