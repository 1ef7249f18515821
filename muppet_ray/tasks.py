"""A task = name, task type, label space, data source; and the run's task list from the config.

Sources hand Ray Data a dataset of row references (`read`) and turn each into a canonical example
(`decode`) inside the Ray Data tasks that tokenize, so raw data never passes through the driver.
Canonical fields per task type are listed in each task type's `required_fields`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from muppet_ray import suite
from muppet_ray.config import Config, TaskSpec
from muppet_ray.errors import ConfigError, DataError
from muppet_ray.task_types import TASK_TYPES, TaskType

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class BuiltinSource:
    """A task of the generated built-in suite; `read` yields indices, `decode` generates."""

    task: str
    seed: int
    scale: float
    origin: str = "built-in suite"
    shuffled: bool = True  # examples are i.i.d. draws already

    def num_examples(self, split: str) -> int:
        return suite.size(self.task, split, self.scale)

    def read(self, split: str):
        import ray.data  # tasks and features work without Ray; only reading needs it

        return ray.data.range(self.num_examples(split)).rename_columns({"id": "_id"})

    def decode(self, row: dict[str, Any], split: str) -> dict[str, Any]:
        index = int(row["_id"])
        example = suite.example(self.task, split, index, self.seed)
        return {**example, "_id": index, "_origin": self.origin, "_row": index}

    def sample(self, split: str, n: int) -> list[dict[str, Any]]:
        count = min(n, self.num_examples(split))
        return [self.decode({"_id": i}, split) for i in range(count)]


@dataclass(frozen=True)
class JsonLinesSource:
    """A JSON Lines file (or a directory of them), local or in object storage.

    Rows keep their raw line until `decode`, so files with loosely typed values don't trip
    Arrow's schema inference, and every error can name the file and line.
    """

    train: str
    validation: str | None
    validation_fraction: float
    fields: dict[str, str]
    seed: int
    shuffled: bool = False

    def _path(self, split: str) -> str:
        return self.validation if split == "validation" and self.validation else self.train

    def read(self, split: str):
        import ray.data

        ds = ray.data.read_binary_files(self._path(split), include_paths=True)
        held_out = None if self.validation else (split == "validation")
        fraction, seed = self.validation_fraction, self.seed

        def lines(file: dict[str, Any]) -> list[dict[str, Any]]:
            text = file["bytes"].decode("utf-8", errors="replace")
            file_key = zlib.crc32(file["path"].encode()) & 0xFFFF
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                if held_out is not None:
                    draw = zlib.crc32(f"{seed}/{file['path']}/{number}".encode()) / 2**32
                    if (draw < fraction) != held_out:
                        continue
                rows.append({"_id": (file_key << 32) | number, "_origin": file["path"],
                             "_row": number, "_json": line})
            return rows

        return ds.flat_map(lines)

    def decode(self, row: dict[str, Any], split: str) -> dict[str, Any]:
        where = {"_id": int(row["_id"]), "_origin": row["_origin"], "_row": int(row["_row"])}
        try:
            raw = json.loads(row["_json"])
        except json.JSONDecodeError as e:
            raise DataError(f"{row['_origin']}, row {row['_row']}: not valid JSON ({e.msg})"
                            ) from None
        if not isinstance(raw, dict):
            raise DataError(f"{row['_origin']}, row {row['_row']}: expected a JSON object")
        canonical = {name: raw.get(column) for name, column in self.fields.items()}
        return {**raw, **canonical, **where}

    def sample(self, split: str, n: int) -> list[dict[str, Any]]:
        return [self.decode(r, split) for r in self.read(split).take(n)]

    def check_exists(self, task: str) -> None:
        for path in filter(None, (self.train, self.validation)):
            try:
                fs, local = pafs.FileSystem.from_uri(path)
            except Exception:
                fs, local = pafs.LocalFileSystem(), path
            if fs.get_file_info(local).type == pafs.FileType.NotFound:
                raise DataError(f"task {task!r}: file {path!r} does not exist")


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
    task_type = TASK_TYPES[spec.type]
    known = task_type.required_fields + task_type.optional_fields
    unknown = sorted(set(spec.fields) - set(known))
    if unknown:
        raise ConfigError(f"tasks.custom ({spec.name}).fields: {unknown} are not fields of "
                          f"{spec.type} tasks; they have {list(known)}")
    source = JsonLinesSource(spec.train, spec.validation, spec.validation_fraction,
                             dict(spec.fields), config.training.seed)
    return Task(spec.name, spec.type, source, tuple(spec.labels or ()))


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

