"""Where a task's examples come from.

A source hands Ray Data a dataset of row references (`read`) and turns each into a canonical
example (`decode`) inside the Ray Data tasks that tokenize, so raw data never passes through the
driver. Every canonical example carries `_id` (stable within its split), `_origin` (file) and
`_row` (row in that file), so errors can name file and row.

File formats (local paths or s3:// / gs:// URIs; a file or a directory of files):
    jsonl     one JSON object per line
    json      a JSON array of objects (or {"data": [...]})
    csv       a header row, then one row per example
    parquet   one row per example
    squad     the SQuAD v1.1/v2 JSON format: one example per question
    bigbench  the BIG-bench JSON task format: classification when every example has the same
              choices, multiple choice when they differ, generation with `target`
    hub       a Hugging Face Hub dataset split, from the Hub's Parquet conversion (hf://) or a
              mirror of it laid out the same way
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from muppet_ray import suite
from muppet_ray.errors import DataError, unwrap_data_error

HASH_LIMIT = 256 * 2**20  # local files up to this size are fingerprinted by their bytes
FORMATS = ("jsonl", "json", "csv", "parquet", "squad", "bigbench", "hub", "text")
BAD_ROW = "_muppet_bad_row"  # a row the parser could not read, with the reason


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

    def fingerprint(self, split: str) -> str:
        return ""  # (generated: the source's fields say it all)

    def sample(self, split: str, n: int) -> list[dict[str, Any]]:
        count = min(n, self.num_examples(split))
        return [self.decode({"_id": i}, split) for i in range(count)]


# ------------------------------------------------------------------------ parsers


def _text(data: bytes, path: str, first_line: int = 1, errors: str = "strict") -> str:
    """The bytes as UTF-8 text (a byte-order mark is dropped). Other bytes are an error naming
    the line, or with errors="replace" (a task's `decode_errors`, asked for explicitly) U+FFFD."""
    try:
        return data.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})"
                        ) from None


def _jsonl(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                yield number, _loads(_text(line, path, number, errors), path, number)
            except DataError as e:  # one bad line: reported (or skipped) when decoded
                yield number, {BAD_ROW: str(e)}


def _plain(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(_text(data, path, errors=errors).splitlines(), 1):
        if line.strip():
            yield number, {"text": line.strip()}


def _json(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    records = _loads(_text(data, path, errors=errors), path, None)
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of examples (or {{'data': [...]}})")
    yield from enumerate(records, 1)


def _csv(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    text = _text(data, path, errors=errors)
    yield from enumerate(csv.DictReader(io.StringIO(text)), 2)  # line 1 is the header


def _parquet(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1)


def _squad(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    document = _loads(_text(data, path, errors=errors), path, None)
    number = 0
    for article in document.get("data", []):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                number += 1
                answers = qa.get("answers") or []
                first = answers[0] if answers else {"text": "", "answer_start": -1}
                yield number, {
                    "id": qa.get("id"), "title": article.get("title"),
                    "question": qa.get("question"), "context": paragraph.get("context"),
                    "answer": first.get("text"), "answer_start": first.get("answer_start"),
                    "answers": [a.get("text") for a in answers],
                    "answer_starts": [a.get("answer_start") for a in answers],
                }


def bigbench_kind(document: dict) -> tuple[str, tuple[str, ...]]:
    """(task type, label space) of a BIG-bench task (see the module docstring)."""
    examples = document.get("examples") or []
    if examples and all("target_scores" in e for e in examples):
        choice_sets = {tuple(e["target_scores"]) for e in examples}
        if len(choice_sets) == 1:
            return "classification", next(iter(choice_sets))
        return "multiple_choice", ()
    if examples and all("target" in e for e in examples):
        return "generation", ()
    return "unknown", ()


def _bigbench(data: bytes, path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    document = _loads(_text(data, path, errors=errors), path, None)
    kind, _ = bigbench_kind(document)
    for number, example in enumerate(document.get("examples", []), 1):
        text = str(example.get("input", "")).strip()
        if kind == "generation":
            target = example.get("target")
            yield number, {"source": text, "target": target[0] if isinstance(target, list)
                           else target}
            continue
        scores = example.get("target_scores", {})
        best = max(scores, key=scores.get) if scores else None
        if kind == "classification":
            yield number, {"text": text, "label": best}
        else:
            choices = list(scores)
            yield number, {"context": text, "choices": choices,
                           "label": choices.index(best) if best is not None else None}


PARSERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "squad": _squad,
           "bigbench": _bigbench, "hub": _parquet, "text": _plain}


def _loads(text: str, path: str, number: int | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f", row {number}" if number is not None else f", line {e.lineno}"
        raise DataError(f"{path}{where}: not valid JSON ({e.msg})") from None


# ------------------------------------------------------------------------- files


def resolve_field(record: dict[str, Any], path: str | list[str]) -> Any:
    """A field by dotted path (`answers.text.0`), or a list of fields (`[sol1, sol2]`)."""
    if isinstance(path, list):
        return [resolve_field(record, p) for p in path]
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(
                part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


@dataclass(frozen=True)
class FileSource:
    """A task read from files. Rows keep their raw record (as JSON text) until `decode`, so
    loosely typed files don't trip Arrow's schema inference and errors can name file and row.
    Without a validation file, a seeded `validation_fraction` of the rows is held out; a
    seeded `test_fraction` of the train file's rows is held out as the test split."""

    task: str
    train: str
    validation: str | None
    validation_fraction: float
    format: str
    fields: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    label_map: dict[str, Any] = field(default_factory=dict)
    decode_errors: str = "strict"
    shuffled: bool = False
    test_fraction: float = 0.0

    def _path(self, split: str) -> str:
        return self.validation if split == "validation" and self.validation else self.train

    def _band(self, split: str) -> tuple[float, float] | None:
        """The rows of the train file this split keeps: those whose seeded draw in [0, 1) falls
        in [low, high); None: every row of its own file."""
        if split == "validation" and self.validation:
            return None
        validation = 0.0 if self.validation else self.validation_fraction
        return {"validation": (0.0, validation),
                "test": (validation, validation + self.test_fraction),
                "train": (validation + self.test_fraction, 1.0)}[split]

    def read(self, split: str):
        import ray.data

        parse = PARSERS[self.format]
        band, seed, task = self._band(split), self.seed, self.task
        errors = self.decode_errors

        filesystem, root = _filesystem(self._path(split))

        def rows(file: dict[str, Any]) -> list[dict[str, Any]]:
            path = file["path"]
            # Keyed by the path below the configured one, so the held-out rows and ids stay the
            # same when the data moves (a local mirror, a bucket, another checkout).
            key = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
            file_key = zlib.crc32(key.encode()) & 0xFFFF
            out = []
            try:
                parsed = list(parse(file["bytes"], path, errors))
            except DataError as e:
                raise DataError(f"task {task!r}, {e}") from None
            for number, record in parsed:
                if band is not None:
                    draw = zlib.crc32(f"{seed}/{key}/{number}".encode()) / 2**32
                    if not band[0] <= draw < band[1]:
                        continue
                out.append({"_id": (file_key << 32) | number, "_origin": path, "_row": number,
                            "_json": json.dumps(record, default=str)})
            return out

        return ray.data.read_binary_files(root, filesystem=filesystem,
                                          include_paths=True).flat_map(rows)

    def decode(self, row: dict[str, Any], split: str) -> dict[str, Any]:
        record = json.loads(row["_json"])
        if isinstance(record, dict) and BAD_ROW in record:
            raise DataError(f"task {self.task!r}, {record[BAD_ROW]}")
        if not isinstance(record, dict):
            raise DataError(f"task {self.task!r}, {row['_origin']}, row {row['_row']}: expected "
                            f"an object with fields, got {type(record).__name__}")
        example = {**record, **{name: resolve_field(record, path)
                                for name, path in self.fields.items()}}
        if self.label_map and str(example.get("label")) in self.label_map:
            example["label"] = self.label_map[str(example["label"])]
        return {**example, "_id": int(row["_id"]), "_origin": row["_origin"],
                "_row": int(row["_row"])}

    def fingerprint(self, split: str) -> str:
        """The content of the split's files: each file's path (below the configured one) and
        size, and a hash of its bytes (local files up to HASH_LIMIT; larger and remote files
        by their modification time instead, to keep starts cheap)."""
        fs, root = _filesystem(self._path(split))
        info = fs.get_file_info(root)
        files = ([i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if i.is_file] if info.type == pafs.FileType.Directory else [info])
        digest = hashlib.sha256()
        for file in sorted(files, key=lambda i: i.path):
            digest.update(f"{posixpath.relpath(file.path, root)}:{file.size}:".encode())
            if isinstance(fs, pafs.LocalFileSystem) and (file.size or 0) <= HASH_LIMIT:
                with fs.open_input_stream(file.path) as f:
                    digest.update(hashlib.sha256(f.read()).digest())
            else:
                digest.update(str(file.mtime_ns).encode())
        return digest.hexdigest()

    def sample(self, split: str, n: int) -> list[dict[str, Any]]:
        """Up to n decodable rows (for the tokenizer; bad rows are reported by the cache)."""
        try:
            rows = self.read(split).take(n)
        except Exception as e:  # a DataError raised inside a Ray task arrives wrapped
            raise unwrap_data_error(e) from None
        examples = []
        for row in rows:
            try:
                examples.append(self.decode(row, split))
            except DataError:
                continue
        return examples

    def check_exists(self, task: str) -> None:
        for path in filter(None, (self.train, self.validation)):
            fs, local = _filesystem(path)
            if fs.get_file_info(local).type == pafs.FileType.NotFound:
                raise DataError(f"task {task!r}: file {path!r} does not exist")


def hub_path(dataset: str, config: str, split: str, mirror: str | None) -> str:
    """Where the Hub's Parquet conversion keeps a split: on the Hub, or in a mirror of it."""
    root = mirror.rstrip("/") if mirror else f"hf://datasets/{dataset}@~parquet"
    return f"{root}/{dataset}/{config}/{split}" if mirror else f"{root}/{config}/{split}"


def _filesystem(path: str):
    """(pyarrow filesystem, path in it). hf:// goes through huggingface_hub, which honours
    HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), path[len("hf://"):]
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), path


def read_small_file(path: str) -> bytes:
    """A whole file, on the driver (for looking inside a task file before Ray starts)."""
    fs, local = _filesystem(path)
    info = fs.get_file_info(local)
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(local)) if i.is_file)
        if not files:
            raise DataError(f"{path!r}: directory has no files")
        local = files[0]
    with fs.open_input_stream(local) as f:
        return f.read()
