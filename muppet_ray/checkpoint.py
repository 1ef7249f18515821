"""The checkpoint format, end to end: write, verify, find the newest usable one, reshard, load.

A checkpoint is a directory `checkpoint_<step>` (or `checkpoint_<step>_<n>`, see `dir_name`) in
the run directory, registered by Ray Train once every worker has uploaded its part: DeepSpeed's
sharded files under `deepspeed/` (TAG), rank 0's `checkpoint.json` (step, world size, the nodes
that wrote the shards) and each worker's manifest. Once resumed by another number of workers, it
also holds its `universal/` form (see `fetch_universal`). Nothing outside this module knows
these names.

On resume each worker fetches only the files it loads (`fetch`: all but the other workers' ZeRO
partitions), checking them against the manifests as they arrive: the workers verify their own
parts side by side, and none waits in a collective while another hashes the rest.

Ray Train registers a checkpoint once every worker has uploaded its files, so a run killed while
writing one never resumes from it. Registration says nothing of the bytes, though: a file cut
short or altered in storage later would fail every restart the same way. So each worker also
writes a manifest of its files (sizes and SHA-256) as the last file of its part, and a resume
takes the newest registered checkpoint whose manifests all verify, with one warning line for each
one it passes over.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray._common.retry import call_with_retry  # (Ray Train's retry of uploads; ray is pinned)
from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS

from muppet_ray.errors import RunStopped
from muppet_ray.storage import RunDir
from muppet_ray.workers import Workers

MANIFEST_PREFIX = "manifest-rank"
CHECKPOINT_STATE = "checkpoint.json"  # rank 0: step, world size, nodes of the shards
TAG = "deepspeed"  # DeepSpeed's folder (its "tag") inside a checkpoint
UNIVERSAL = "universal"  # the checkpoint as DeepSpeed's universal checkpoint, once made
KEPT = ("step", "before", "mixture")  # what a checkpoint keeps beside DeepSpeed's state
UNIVERSAL_DONE = "universal.json"  # written last: {"problem": None or what was wrong}
_READ = 1 << 22
_PARTITION = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-worker ZeRO files
log = logging.getLogger("muppet_ray")


# ------------------------------------------------------------------- write and load


def save(engine, directory: str, kept: dict, rank: int, world_size: int, nodes: list,
         zero_stage: int) -> None:
    """This worker's part of the checkpoint of step `kept["step"]`, written into `directory` (for
    Ray Train to upload): DeepSpeed's shards (with `kept`, DeepSpeed's client state), rank 0's
    state, and the worker's manifest, last."""
    step = kept["step"]
    engine.save_checkpoint(directory, tag=TAG, client_state=kept)
    if rank == 0:
        with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
            json.dump({"step": step, "world_size": world_size, "nodes": nodes,
                       "zero_stage": zero_stage}, f)
    write_manifest(directory, rank)


def saved_state(fs: pafs.FileSystem, path: str) -> dict:
    """Rank 0's record of the checkpoint: its step, the number of workers that wrote it, their
    nodes and ZeRO stage ({} if missing or unreadable: `fetch` then says what is wrong)."""
    state = f"{path}/{CHECKPOINT_STATE}"
    if fs.get_file_info(state).type == pafs.FileType.NotFound:
        return {}
    with fs.open_input_stream(state) as f:
        try:
            saved = json.loads(f.read())
        except ValueError:
            return {}
    return saved if isinstance(saved, dict) else {}


def saved_world_size(fs: pafs.FileSystem, path: str) -> int | None:
    """The number of workers that wrote the checkpoint (None: unknown)."""
    return world_size_in(saved_state(fs, path))


def world_size_in(state: dict) -> int | None:
    try:
        return int(state["world_size"])
    except (KeyError, TypeError, ValueError):
        return None


def zero_stage_in(state: dict) -> int | None:
    """The ZeRO stage a checkpoint was written under (None: not recorded, or not a stage)."""
    stage = state.get("zero_stage")
    return stage if stage in (0, 1, 2, 3) and not isinstance(stage, bool) else None


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


def dir_name(step: int, existing: set[str]) -> str:
    """checkpoint_<step>, or with a suffix where that directory is there already (one
    half-written before a kill, or a damaged one passed over): Ray Train would upload into it,
    mixing old files with new, and later delete it as the old entry. (Worker 0 chooses it from
    the run directory's listing; every worker takes its choice.)"""
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
    return fetch(fs, path, None)


def needed_by(relative: str, rank: int | None) -> bool:
    """Whether worker `rank` (of as many as wrote the checkpoint) loads the file: all but the
    other workers' ZeRO partitions. None: every file."""
    found = _PARTITION.search(relative)
    return rank is None or found is None or int(found[1]) == rank


def fetch(fs: pafs.FileSystem, path: str, local: str | None, rank: int | None = None
          ) -> str | None:
    """Copy the files of the checkpoint at `path` that worker `rank` needs (every file: None)
    into `local` (None: read them only), each checked against its manifest as it arrives;
    returns what is wrong, or None."""
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path))]
    manifests = sorted(n for n in names if n.startswith(MANIFEST_PREFIX))
    if not manifests:  # (from before manifests: taken as it is)
        files = {info.path[len(path) + 1:]: None for info in fs.get_file_info(
            pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.File}
    elif CHECKPOINT_STATE not in names:
        return f"{CHECKPOINT_STATE} is missing"
    else:
        world_size = saved_world_size(fs, path)
        if world_size is None:
            return f"{CHECKPOINT_STATE} is unreadable"
        if len(manifests) != world_size:
            return f"it has the manifests of {len(manifests)} of its {world_size} workers"
        files = {}
        for manifest in manifests:
            with fs.open_input_stream(f"{path}/{manifest}") as f:
                try:
                    files.update(json.loads(f.read()))
                except ValueError:
                    return f"{manifest} is unreadable"
    for relative, expected in sorted(files.items()):
        if needed_by(relative, rank) and not relative.startswith(f"{UNIVERSAL}/"):
            problem = _copy_checked(fs, f"{path}/{relative}", relative, expected,
                                    local and os.path.join(local, relative))
            if problem:
                return problem
    return None


def _copy_checked(fs: pafs.FileSystem, source: str, relative: str, expected, target: str | None
                  ) -> str | None:
    """Copy one file to `target` (None: only read it), checked against its manifest entry
    `expected` ([size, SHA-256]; None: not listed, so not checked)."""
    info = fs.get_file_info(source)
    if info.type == pafs.FileType.NotFound:
        return f"{relative} is missing"
    if expected is None and target is None:
        return None
    if expected is not None and info.size != expected[0]:
        return f"{relative} has {info.size} bytes, its manifest says {expected[0]}"
    digest = hashlib.sha256()
    if target:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    with fs.open_input_stream(source) as stream, (
            open(target, "wb") if target else contextlib.nullcontext()) as out:
        while chunk := stream.read(_READ):
            digest.update(chunk)
            if out:
                out.write(chunk)
    if expected is not None and digest.hexdigest() != expected[1]:
        return f"{relative} does not match its manifest's SHA-256"
    return None


def fetch_universal(fs: pafs.FileSystem, path: str, local: str, rank: int,
                    poll_s: float = 1.0, timeout_s: float = 3600) -> str | None:
    """A checkpoint written by another number of workers, as DeepSpeed's universal checkpoint
    in `local` (which loads under any number). Worker 0 converts it once, into the checkpoint's
    `universal/` in storage, then writes UNIVERSAL_DONE (with what was wrong, if the conversion
    failed); the others wait for that file (not in a collective, which could time out on a large
    model; at most `timeout_s`) and fetch the result. Returns what is wrong with the checkpoint,
    or None."""
    done = f"{path}/{UNIVERSAL_DONE}"
    if rank == 0 and fs.get_file_info(done).type == pafs.FileType.NotFound:
        with tempfile.TemporaryDirectory(prefix="muppet-reshard-") as whole:
            problem = fetch(fs, path, f"{whole}/sharded")
            if problem is None:
                try:
                    _to_universal(f"{whole}/sharded", f"{whole}/{UNIVERSAL}")
                except Exception as e:  # (a checkpoint DeepSpeed cannot convert: passed over)
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    problem = f"DeepSpeed could not make it universal: {first}"
            if problem is None:
                fs.create_dir(f"{path}/{UNIVERSAL}", recursive=True)
                pafs.copy_files(f"{whole}/{UNIVERSAL}", f"{path}/{UNIVERSAL}",
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(done) as f:
            f.write(json.dumps({"problem": problem}).encode())
    deadline = time.monotonic() + timeout_s
    while fs.get_file_info(done).type == pafs.FileType.NotFound:
        if time.monotonic() > deadline:
            return f"worker 0 did not make it universal within {timeout_s:g} s"
        time.sleep(poll_s)
    with fs.open_input_stream(done) as f:
        problem = json.loads(f.read())["problem"]
    if problem is None:
        pafs.copy_files(f"{path}/{UNIVERSAL}", local, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return problem


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


# ---------------------------------------------------------------- the workers' side


@dataclass(frozen=True)
class Fetched:
    """A checkpoint fetched to resume from."""

    name: str
    local: str  # where its files are, for the engine to load
    resharded: bool  # written by another number of workers: fetched as a universal checkpoint
    state: dict  # rank 0's record of it (CHECKPOINT_STATE)

    @property
    def zero_stage(self) -> int | None:
        return zero_stage_in(self.state)


LOCAL_COPY = "muppet-ckpt-"  # + the writer's pid: a checkpoint's local copy, until uploaded
UPLOAD_NOTICE_S = 300.0  # how often a save kept waiting for the last upload says so


def wait_for_upload(uploaded: threading.Event, waiting: str, last: str) -> None:
    """Wait until the upload of checkpoint `last` has ended, saying every UPLOAD_NOTICE_S that
    `waiting` still waits for it: Ray warns while an upload is slow, but an upload that never
    began (Ray did not call the upload function) would otherwise hold the run without a word."""
    waited = 0.0
    while not uploaded.wait(UPLOAD_NOTICE_S):
        waited += UPLOAD_NOTICE_S
        log.warning(f"[muppet-ray] {waiting} still waits for the upload of {last} to end "
                    f"({waited:,.0f} s so far; one local copy waits for its upload at a time)")


def local_copies() -> dict[str, int]:
    """The local copies of checkpoints on this node, with their writers' pids."""
    copies = {}
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{LOCAL_COPY}*-*")):
        pid = os.path.basename(path)[len(LOCAL_COPY):].split("-")[0]
        if pid.isdigit():
            copies[path] = int(pid)
    return copies


def copies_of_dead_workers() -> list[str]:
    """Those whose worker was killed before uploading them (a SIGKILL leaves it no time to
    clean up)."""
    return [path for path, pid in local_copies().items() if not process_alive(pid)]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


class Checkpointer:
    """A training worker's checkpoints: it finds the newest intact one to resume from (fetching
    it resharded if another number of workers wrote it), restores it, and saves new ones, at the
    same steps and under the same names on every worker."""

    def __init__(self, run_dir: RunDir, workers: Workers, sharded: bool, per_step: int):
        self.run_dir, self.workers = run_dir, workers
        self.sharded = sharded  # ZeRO 1-3: a checkpoint of another world size needs resharding
        self.per_step = per_step  # micro-batches per step (for the resharding warning)
        # the last save's name, and an event set once its upload has ended
        self._uploading: tuple[str, threading.Event] | None = None
        for copy in copies_of_dead_workers():  # (each start of a worker on the node looks)
            shutil.rmtree(copy, ignore_errors=True)

    @contextlib.contextmanager
    def latest(self) -> Iterator[Fetched | None]:
        """The newest checkpoint that Ray Train registered and whose files verify on every
        worker, fetched for the duration of the block; None for a run with none yet. A run
        whose checkpoints are all damaged stops."""
        latest = ray.train.get_checkpoint()
        with tempfile.TemporaryDirectory(prefix="muppet-resume-") as local:
            found = self._newest_intact(latest, local) if latest is not None else None
            if latest is not None and found is None:
                raise RunStopped(0, f"no checkpoint of {self.run_dir.root!r} is intact (each "
                                 "failed its manifest, see the warnings above); remove the "
                                 "damaged ones or start a new run")
            yield found

    def _newest_intact(self, latest: ray.train.Checkpoint, local: str) -> Fetched | None:
        fs, (parent, newest) = latest.filesystem, latest.path.rsplit("/", 1)
        rank, world = self.workers.rank, self.workers.world
        # (rank 0 reads Ray Train's record; all take its list)
        names = self.workers.from_rank0(
            [n for n in self.run_dir.registered_checkpoints() if n <= newest] or [newest]
            if rank == 0 else None)
        for name in reversed(names):
            path = f"{parent}/{name}"
            state = saved_state(fs, path)
            saved = world_size_in(state)
            reshard = self.sharded and saved not in (None, world)
            shutil.rmtree(local, ignore_errors=True)
            problem = (fetch_universal(fs, path, local, rank) if reshard
                       else fetch(fs, path, local, rank))
            if problem and (rank == 0 or not reshard):
                log.warning(f"[muppet-ray] {name} is damaged ({problem}): not resuming from it")
            if not self.workers.any(bool(problem)):
                if rank == 0 and name != newest:
                    log.warning(f"[muppet-ray] resuming from {name}, the newest intact "
                                "checkpoint")
                if rank == 0 and reshard:
                    log.warning(f"[muppet-ray] resuming with {world} workers from a checkpoint "
                                f"of {saved}: each now runs {self.per_step // world} of the "
                                f"step's {self.per_step} micro-batches")
                return Fetched(name, local, reshard, state)
        return None

    @staticmethod
    def restore(engine, fetched: Fetched) -> dict:
        """Load a fetched checkpoint into the engine; returns what `save` kept with it."""
        _, client_state = engine.load_checkpoint(fetched.local, tag=TAG)
        # (DeepSpeed hands back its own metadata too, which it refuses to be given again)
        return {key: client_state[key] for key in KEPT if key in client_state}

    def save(self, engine, step: int, zero_stage: int, kept: dict, metrics: dict,
             upload=None) -> None:
        """Checkpoint `step` (with `kept`, handed back by `restore`), reported to Ray Train
        with `metrics`; `upload`: a `checkpoint_upload_fn` (tests' fault injection)."""
        # Rank 0 names the checkpoint (after those in the run directory) and every worker takes
        # its name; each says on which node it writes its shards.
        every = self.workers.gather((
            ray.get_runtime_context().get_node_id(),
            dir_name(step, set(self.run_dir.list(""))) if self.workers.rank == 0 else None))
        nodes, name = [node for node, _ in every], every[0][1]
        if self._uploading is not None:
            # One local copy waits for its upload at a time: storage slower than the checkpoints
            # would otherwise fill the node's disk with them.
            wait_for_upload(self._uploading[1], name, self._uploading[0])
        directory = tempfile.mkdtemp(prefix=f"{LOCAL_COPY}{os.getpid()}-")
        try:
            save(engine, directory, {**kept, "step": step}, self.workers.rank,
                 self.workers.world, nodes, zero_stage)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        uploaded, failed = threading.Event(), []
        persist = upload or ray.train.get_context().get_storage().persist_current_checkpoint

        def upload_then_drop(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            # The local copy goes once the upload has ended, whether or not it succeeded (Ray
            # would remove it only after a success, and after this returns). Ray retries some
            # storage errors by calling this again: they are retried here, as Ray would, before
            # the copy goes, and a call after that fails as the last one did.
            if failed:
                raise failed[0]
            try:
                return call_with_retry(persist, "upload checkpoint", AWS_RETRYABLE_TOKENS, 3, 32,
                                       checkpoint, name)
            except BaseException as e:
                failed.append(e)
                raise
            finally:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                uploaded.set()

        # Uploaded in the background while training goes on (or the run ends: the final one
        # beside the export); Ray Train registers it only once every worker's part is in
        # storage, so a run killed before still resumes from the one before. Its reports keep
        # their order.
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload_then_drop,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=False)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._uploading = (name, uploaded)
