"""The docs' commands run as written from the repo root: every `--config` file and `--set` key
they name exists, a config that reads ../shared gets MUPPET_SHARED, no command names one
machine's scratch paths, and every file the docs link to is there (no Ray)."""

import re
import shlex
from pathlib import Path

import pytest

from muppet_ray.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def blocks(doc: Path) -> list[str]:
    """The doc's fenced blocks but ```text ones (pictures), each as one string."""
    found, lines, language = [], None, ""
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            if lines is None:
                lines, language = [], line[3:].strip()
            else:
                if language != "text":
                    found.append("\n".join(lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return found


def commands(doc: Path) -> list[list[str]]:
    """The shell commands of the doc's fenced blocks (continuation lines joined), as words."""
    found = []
    for block in blocks(doc):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if re.match(r"^(MUPPET_SHARED=(\$\(realpath \S+\)|\S+) )?"
                        r"(muppet-ray|python|ray job submit)\b", line):
                found.append(shlex.split(line))
    return found


def set_keys() -> set[str]:
    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield f"{prefix}{name}"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, f"{prefix}{name}.")
    return set(keys(Config))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_and_setting_a_doc_names_exists(doc):
    known = set_keys()
    for words in commands(doc):
        for flag, value in zip(words, words[1:]):
            if flag == "--config":
                assert (ROOT / value).is_file(), f"{doc.name}: {' '.join(words)}: no {value}"
                shared = "${MUPPET_SHARED}" in (ROOT / value).read_text()
                assert not shared or words[0].startswith("MUPPET_SHARED="), \
                    f"{doc.name}: {' '.join(words)}: {value} needs MUPPET_SHARED"
            if flag == "--set":
                key = value.split("=", 1)[0]
                assert key in known, f"{doc.name}: {' '.join(words)}: no setting {key}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_linked_file_exists(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links {target}: not there"


def test_no_command_names_one_machines_scratch_paths():
    for doc in DOCS:
        for words in commands(doc):
            line = " ".join(words)
            assert not re.search(r"(^|[ =])/(work|tmp)/", line), f"{doc.name}: {line}"


def test_the_docs_have_commands_to_check():
    assert sum(len(commands(doc)) for doc in DOCS) > 20
