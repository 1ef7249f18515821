"""The catalog: the paper's pre-finetuning datasets as Hub task specs (catalog.yaml, data, not
code), by name and by family. `muppet-ray tasks list` prints it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from muppet_ray.config import TaskSpec


@dataclass(frozen=True)
class CatalogEntry:
    spec: TaskSpec
    families: tuple[str, ...]
    size: int | None

    @property
    def source(self) -> str:
        return f"hf:{self.spec.hub}/{self.spec.hub_config}"


@cache
def catalog() -> dict[str, CatalogEntry]:
    raw = yaml.safe_load(resources.files("muppet_ray").joinpath("catalog.yaml").read_text())
    entries = {}
    for item in raw:
        families, size = tuple(item.pop("families", ())), item.pop("size", None)
        entries[item["name"]] = CatalogEntry(TaskSpec.model_validate(item), families, size)
    return entries


def families() -> dict[str, list[str]]:
    """Family -> its catalog tasks, including one family per task type."""
    out: dict[str, list[str]] = {}
    for name, entry in catalog().items():
        for family in (*entry.families, entry.spec.type):
            out.setdefault(family, []).append(name)
    return out


def table(family: str | None = None) -> str:
    rows = [("name", "type", "labels", "families", "source", "size")]
    for name, entry in catalog().items():
        if family and family not in entry.families and family != entry.spec.type:
            continue
        labels = entry.spec.labels or []
        shown = ", ".join(labels) if len(labels) <= 3 else f"{len(labels)} labels"
        rows.append((name, entry.spec.type, shown or "-", ",".join(entry.families),
                     entry.source, f"{entry.size:,}" if entry.size else "?"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
