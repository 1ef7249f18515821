"""Checkpoint integrity: what each worker wrote, and whether it is all still there.

Ray Train registers a checkpoint once every worker has uploaded its files, so a run killed while
writing one never resumes from it. Registration says nothing of the bytes, though: a file cut
short or altered in storage later would fail every restart the same way. So each worker also
writes a manifest of its files (sizes and SHA-256) as the last file of its part, and a resume
takes the newest registered checkpoint whose manifests all verify, with one warning line for each
one it passes over.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.fs as pafs

MANIFEST_PREFIX = "manifest-rank"
CHECKPOINT_STATE = "checkpoint.json"  # rank 0: step, world size, nodes of the shards
_READ = 1 << 22


def write_manifest(directory: str, rank: int) -> None:
    """List the files of this worker's part of a checkpoint (call it after writing them)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            if not relative.startswith(MANIFEST_PREFIX):
                with open(path, "rb") as f:
                    files[relative] = [os.path.getsize(path), _sha256(f)]
    with open(os.path.join(directory, f"{MANIFEST_PREFIX}{rank:03d}.json"), "w") as f:
        json.dump(files, f)


def damage(fs: pafs.FileSystem, path: str) -> str | None:
    """What is wrong with the checkpoint at `path`, or None if its manifests verify. One written
    before checkpoints had manifests is taken as it is."""
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path))]
    manifests = sorted(n for n in names if n.startswith(MANIFEST_PREFIX))
    if not manifests:
        return None
    if CHECKPOINT_STATE not in names:
        return f"{CHECKPOINT_STATE} is missing"
    with fs.open_input_stream(f"{path}/{CHECKPOINT_STATE}") as f:
        world_size = json.loads(f.read())["world_size"]
    if len(manifests) != world_size:
        return f"it has the manifests of {len(manifests)} of its {world_size} workers"
    for manifest in manifests:
        with fs.open_input_stream(f"{path}/{manifest}") as f:
            files = json.loads(f.read())
        for relative, (size, digest) in files.items():
            info = fs.get_file_info(f"{path}/{relative}")
            if info.type == pafs.FileType.NotFound:
                return f"{relative} is missing"
            if info.size != size:
                return f"{relative} has {info.size} bytes, its manifest says {size}"
            with fs.open_input_stream(f"{path}/{relative}") as f:
                if _sha256(f) != digest:
                    return f"{relative} does not match its manifest's SHA-256"
    return None


def newest_intact(fs: pafs.FileSystem, parent: str, names: list[str], warn=None) -> str | None:
    """The last of `names` (checkpoint directories in `parent`, oldest first) that `damage`
    finds nothing wrong with; `warn(message)` for each one passed over."""
    for name in reversed(names):
        problem = damage(fs, f"{parent}/{name}")
        if problem is None:
            return name
        if warn:
            warn(f"{name} is damaged ({problem}): not resuming from it")
    return None


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_READ):
        digest.update(chunk)
    return digest.hexdigest()
