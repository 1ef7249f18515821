"""Storage: everything a run reads or writes, at a local path or an s3:// / gs:// URI, reached
through pyarrow's filesystems (credentials and endpoint from the environment, as boto3 reads
them: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...; never from a file of ours).

`RunDir` is a directory there; `local_copy` brings a model or tokenizer stored at a URI into this
node's cache, for the libraries that only load local directories (transformers, DeepSpeed).

Layout of `<storage_path>/<run name>/`:
    config.yaml          the resolved config
    tokenizer/           the tokenizer the run trained with
    data.json            the entries of the chunk cache the run reads (data.py; the cache is
                         <storage>/.chunk-cache/, shared by the runs stored there)
    metrics.jsonl        one JSON record per logged step and per evaluation
    tensorboard/         TensorBoard event files
    checkpoint_*/        Ray Train checkpoints (DeepSpeed's sharded files)
    export/              the final model (export.py)
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints


CACHE_DIR_VARIABLE = "MUPPET_CACHE_DIR"  # this node's cache of models stored at URIs
STALE_STAGING_S = 3600  # a staging directory untouched this long is a killed writer's


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(uri: str) -> str:
    return uri.rstrip("/") if is_uri(uri) else str(Path(uri).expanduser().resolve())


class RunDir:
    def __init__(self, uri: str):
        self.root = normalize(uri).rstrip("/")
        self.fs, self.path = pafs.FileSystem.from_uri(self.root)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, relative: str = "") -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def _p(self, relative: str) -> str:
        return f"{self.path}/{relative}" if relative else self.path

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self._p(relative)).type != pafs.FileType.NotFound

    def list(self, relative: str) -> list[str]:
        selector = pafs.FileSelector(self._p(relative), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    def registered_checkpoints(self) -> list[str]:
        """The run's checkpoint directories that Ray Train registered (its
        checkpoint_manager_snapshot.json), oldest first. Ray Train registers one once every
        worker's shards are in it: a directory it has not (a run killed while writing it) is
        never to be read."""
        if not self.exists(CHECKPOINT_SNAPSHOT):
            return []
        results = json.loads(self.read_text(CHECKPOINT_SNAPSHOT)).get("checkpoint_results", [])
        return sorted(r["checkpoint_dir_name"] for r in results
                      if self.exists(r["checkpoint_dir_name"]))

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self._p(relative)) as f:
            return f.read().decode()

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def write_bytes(self, relative: str, data: bytes) -> None:
        parent = os.path.dirname(self._p(relative))
        self.fs.create_dir(parent, recursive=True)
        # Write then rename, so a reader never sees half a file (object stores are atomic).
        temporary = self._p(relative) + ".tmp" if self.is_local else self._p(relative)
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        if temporary != self._p(relative):
            self.fs.move(temporary, self._p(relative))

    def open_input(self, relative: str):
        return self.fs.open_input_file(self._p(relative))

    @staticmethod
    def open_uri(uri: str):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_file(path)

    def remove(self, relative: str = "") -> None:
        info = self.fs.get_file_info(self._p(relative))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._p(relative))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._p(relative))

    def upload(self, local_dir: str, relative: str, replace: bool = True) -> None:
        """Copy a local directory into the run directory (`replace`: instead of what was there;
        else the files of the same names are overwritten and the others kept)."""
        if self.is_local and os.path.abspath(local_dir) == self._p(relative):
            return
        if replace:
            self.remove(relative)
        self.fs.create_dir(self._p(relative), recursive=True)
        pafs.copy_files(local_dir, self._p(relative), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    @contextlib.contextmanager
    def staged(self, relative: str, last: str | None = None):
        """A local directory to write `relative` into, which replaces `relative` on leaving
        (nothing, if the block fails). Local storage: made beside `relative` and renamed into
        place, so the bytes are written once and it is replaced whole. An object store has no
        rename: a temporary directory, uploaded, its file `last` (the one that says it is
        complete) after the rest, so that an upload cut short is never taken as complete."""
        if not self.is_local:
            with tempfile.TemporaryDirectory(prefix="muppet-staged-") as local:
                yield local
                held = None
                if last is not None and os.path.exists(marker := os.path.join(local, last)):
                    with open(marker, "rb") as f:
                        held = f.read()
                    os.remove(marker)
                self.upload(local, relative)
                if held is not None:
                    self.write_bytes(f"{relative}/{last}", held)
            return
        target = self._p(relative)
        parent, name = os.path.split(target)
        # Those a killed writer left, not one another command is writing now (two `finetune
        # --from` of one checkpoint export it to the same place, and replace each other's in
        # turn, with the same content).
        for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.path.getmtime(stale) > STALE_STAGING_S:
                    shutil.rmtree(stale, ignore_errors=True)
        local = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        os.makedirs(local)
        try:
            yield local
            self.remove(relative)
            os.replace(local, target)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def download(self, relative: str, local_dir: str) -> None:
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(self._p(relative), local_dir, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())


def node_cache_dir() -> str:
    """This node's cache of stored models: `$MUPPET_CACHE_DIR`, else below the temporary
    directory (a node's own disk: nodes share nothing but storage)."""
    return os.environ.get(CACHE_DIR_VARIABLE) or os.path.join(tempfile.gettempdir(),
                                                               "muppet-ray-cache")


def local_copy(location: str) -> str:
    """`location` as a local directory: the directory itself where it is local (a Hub id is
    returned as it is); a URI's files copied once into this node's cache.

    The copy is keyed by the URI and its files' names, sizes and modification times, so a model
    written again is fetched again. Processes filling the cache at once (a node's workers) take
    turns on a lock: one downloads, into a directory renamed into place when whole, and the
    others then find it. Nothing is ever removed from the cache: it can be deleted at any time
    no run is starting."""
    if not is_uri(location):
        return location
    fs, path = pafs.FileSystem.from_uri(location)
    path = path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((info.path[len(path) + 1:], info.size, info.mtime_ns) for info in listing
                   if info.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{location}: no files there")
    key = hashlib.sha256(json.dumps([normalize(location), files]).encode()).hexdigest()[:24]
    cache = node_cache_dir()
    target = os.path.join(cache, key)
    if os.path.isdir(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(target):
            partial = tempfile.mkdtemp(prefix=f"{key}.partial-", dir=cache)
            try:
                pafs.copy_files(path, partial, source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.rename(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return target


def check_writable(storage: str) -> None:
    """The storage path must be, or be creatable as, a writable directory; a URI must take a
    write with the environment's credentials (checked before anything starts, so the error
    names the path instead of a traceback from deep inside)."""
    from muppet_ray.errors import ConfigError

    if is_uri(storage):
        try:
            fs, path = pafs.FileSystem.from_uri(storage)
            probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
        except (OSError, ValueError, pa.ArrowException) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"run.storage_path: cannot write to {storage!r} ({first})"
                              ) from None
        return
    existing = Path(storage)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.storage_path: {storage!r} is below {str(existing)!r}, which is a "
                          "file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.storage_path: {str(existing)!r} is not writable")


def run_root(config, name: str) -> RunDir:
    """The directory `name` under the config's `run.storage_path` (a run, a sweep, a grid)."""
    return RunDir(f"{normalize(config.run.storage_path)}/{name}")


def write_rows(root: RunDir, rows: list[dict], columns: list[str]) -> None:
    """`results.json` (every row, whole) and `results.csv` (`columns`) in `root`."""
    root.write_text("results.json", json.dumps(rows, indent=2))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    root.write_text("results.csv", text.getvalue())
