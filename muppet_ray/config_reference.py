"""docs/config.md, generated from the field docstrings of config.py.

    python -m muppet_ray.config_reference > docs/config.md

(tests/test_config.py fails when docs/config.md is not what this prints.)
"""

from __future__ import annotations

import json
import sys

from pydantic import BaseModel

from muppet_ray.config import Config, TaskSpec

HEADER = """# Configuration reference

One typed config (`muppet_ray/config.py`), read from YAML (`--config`) with
`--set section.key=value` overrides (values are parsed as YAML: `--set tasks.include=[a,b]`).
`${VAR}` in a value is read from the environment (and kept unexpanded in the run's files).
Generated from the field docstrings: `python -m muppet_ray.config_reference > docs/config.md`.
"""


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "-"
    return f"`{json.dumps(value)}`"


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_default(model, name)} | {meaning} |")
    return lines


def reference() -> str:
    lines = [HEADER]
    for section, field in Config.model_fields.items():
        lines += [f"## {section}", "", " ".join(field.description.split()), "",
                  *_table(field.annotation), ""]
    lines += ["## a task spec (an item of tasks.custom)", "", " ".join(TaskSpec.__doc__.split()),
              "", *_table(TaskSpec), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
