"""The checkpoint format, end to end: write, verify, find the newest usable one, reshard, load.

A checkpoint is a directory `checkpoint_<step>` (or `checkpoint_<step>_<n>`, see `dir_name`) in
the run directory, registered by Ray Train once every worker has uploaded its part: DeepSpeed's
sharded files under `deepspeed/` (TAG), rank 0's `checkpoint.json` (step, world size, the nodes
that wrote the shards) and each worker's manifest. Nothing outside this module knows these
names.

Ray Train registers a checkpoint once every worker has uploaded its files, so a run killed while
writing one never resumes from it. Registration says nothing of the bytes, though: a file cut
short or altered in storage later would fail every restart the same way. So each worker also
writes a manifest of its files (sizes and SHA-256) as the last file of its part, and a resume
takes the newest registered checkpoint whose manifests all verify, with one warning line for each
one it passes over.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import tempfile

import pyarrow.fs as pafs
import torch

MANIFEST_PREFIX = "manifest-rank"
CHECKPOINT_STATE = "checkpoint.json"  # rank 0: step, world size, nodes of the shards
TAG = "deepspeed"  # DeepSpeed's folder (its "tag") inside a checkpoint
_READ = 1 << 22


# ------------------------------------------------------------------- write and load


def save(engine, directory: str, step: int, rank: int, world_size: int, nodes: list) -> None:
    """This worker's part of the checkpoint of `step`, written into `directory` (for Ray Train
    to upload): DeepSpeed's shards, rank 0's state, and the worker's manifest, last."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"step": step})
    if rank == 0:
        with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
            json.dump({"step": step, "world_size": world_size, "nodes": nodes}, f)
    write_manifest(directory, rank)


def load(engine, directory: str, reshard: bool) -> int:
    """Load a checkpoint into the engine (`reshard`: written by another number of workers, so
    first turned into DeepSpeed's universal checkpoint); returns its step."""
    with tempfile.TemporaryDirectory(prefix="muppet-universal-") as universal:
        if reshard:
            _to_universal(directory, universal)
            directory = universal
        _, client_state = engine.load_checkpoint(directory, tag=TAG)
    return int(client_state["step"])


def saved_world_size(fs: pafs.FileSystem, path: str) -> int | None:
    """The number of workers that wrote the checkpoint (None: from before this was recorded)."""
    state = f"{path}/{CHECKPOINT_STATE}"
    if fs.get_file_info(state).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(state) as f:
        return json.loads(f.read())["world_size"]


def _to_universal(directory: str, out: str) -> None:
    """DeepSpeed's ZeRO checkpoint in `directory` as a universal checkpoint in `out`."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(directory, TAG), output_folder=os.path.join(out, TAG),
        num_extract_workers=1, num_merge_workers=1,  # in this process: no process pools
        keep_temp_folder=False, strict=True, inject_missing_state=True))


def weights(directory: str) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from a (local) checkpoint, whatever its ZeRO stage."""
    if glob.glob(os.path.join(directory, TAG, "*optim_states.pt")):
        # ZeRO 1-3: parameters are sharded with the optimizer state
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=TAG)
    path = os.path.join(directory, TAG, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, TAG))


def dir_name(step: int, existing: set[str]) -> str:
    """checkpoint_<step>, or with a suffix where that directory was there when this attempt
    began (one half-written before a kill, or a damaged one passed over): Ray Train would
    upload into it, mixing old files with new, and later delete it as the old entry."""
    name, attempt = f"checkpoint_{step:06d}", 1
    while name in existing:
        name, attempt = f"checkpoint_{step:06d}_{attempt}", attempt + 1
    return name


def step_of(name: str) -> int:
    """The step of a checkpoint directory name (`dir_name`'s)."""
    parts = name.split("_")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


# ------------------------------------------------------------------------- integrity


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
