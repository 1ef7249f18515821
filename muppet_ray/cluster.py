"""The Ray cluster a run runs on: joining one or starting a local one, and what it can give a
run — GPUs now or once its autoscaler adds them, room for the workers, storage every node sees.

What nodes a cluster's autoscaler can add is read where Ray keeps it: the cluster config an
autoscaler reports to Ray (node groups with their resources and counts, `ray._private.state`;
Ray Train and Ray Data read it for the same decisions), else the cluster launcher's own config on
the head node (`~/ray_bootstrap_config.yaml`, which Ray Tune reads to know it runs on such a
cluster; `ray job submit` runs the driver there). KubeRay's autoscaler describes its node groups
to neither: there, nodes that are not up yet are unknown (set `scaling.use_gpu: true` for GPUs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from muppet_ray.config import VERBOSE, Config, ScalingConfig
from muppet_ray.errors import ConfigError
from muppet_ray.storage import is_uri

# Ray Train's controller checks its workers this often (seconds), read from the environment. On a
# local cluster muppet-ray lowers Ray's 2 s default (see local_cluster_environment).
CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_CHECK_INTERVAL_S = "0.2"
WAIT_LINE_EVERY_S = 30  # a progress line while waiting for the autoscaler
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher's, on the head node
# Set in the local cluster's processes (and so in Tune trials there): no autoscaler can add nodes.
LOCAL_CLUSTER = "MUPPET_LOCAL_CLUSTER"
_started_here = False  # this process started the local cluster it is connected to


def verbose() -> bool:
    """`--verbose`: the console shows what Ray and the libraries print, not only our lines."""
    return os.environ.get(VERBOSE) == "1"


# --------------------------------------------------------------------------- joining one


def start_ray(config: Config) -> None:
    """Join `run.ray_address` (or RAY_ADDRESS), else start a local cluster for this process."""
    _check_interval_setting()
    if ray.is_initialized():
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose() else logging.ERROR
    global _started_here
    if address:
        ray.init(address=address, logging_level=level)
    else:
        # A local cluster: the workers and the Ray Data tasks that feed them share the machine's
        # cores, so declare enough logical CPUs for both (the OS shares the real ones). "local":
        # a new one, even where `ray start` left a cluster that plain ray.init() would join.
        needed = config.scaling.max_workers * config.scaling.cpus_per_worker + 2
        with local_cluster_environment():
            ray.init(address="local", num_cpus=int(max(os.cpu_count() or 1, needed)),
                     logging_level=level, include_dashboard=False)
        _started_here = True
    _keep_ray_off_the_console()
    _pin_autoscaling_coordinator()


def _pin_autoscaling_coordinator() -> None:
    """Ray Train's elastic runs ask Ray's autoscaling coordinator (a detached actor shared with
    Ray Data) how many workers they may restart with. Ray pins it, for good, to the node of
    whichever process first asks for it, which can be a training worker's data stream on a node
    that is later lost: every elastic restart after that waits forever. Asked for first here,
    by the driver, it lives on the driver's node (the head, for `ray job submit`)."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()


def is_local_cluster() -> bool:
    """Whether this process runs on a local cluster muppet-ray started (no autoscaler)."""
    return _started_here or os.environ.get(LOCAL_CLUSTER) == "1"


def _check_interval_setting() -> None:
    """A bad CHECK_INTERVAL would fail the run inside Ray Train's controller, with its traceback."""
    value = os.environ.get(CHECK_INTERVAL)
    try:
        good = value is None or (math.isfinite(float(value)) and float(value) > 0)
    except ValueError:
        good = False
    if not good:
        raise ConfigError(f"{CHECK_INTERVAL}: expected a number of seconds above 0, got {value!r}")


@contextlib.contextmanager
def local_cluster_environment():
    """Settings for a local cluster, in force while `ray.init` starts it: its processes (and the
    Ray Train controllers and workers they start later) keep them from their environment; this
    process gets its own back."""
    saved = {k: os.environ.get(k) for k in (
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_API_SERVER_ADDRESS", CHECK_INTERVAL,
        LOCAL_CLUSTER)}
    cluster_flag = ray._private.ray_constants.ENABLE_RAY_CLUSTER
    # One machine: listen on the loopback address only, not on the machine's routable one
    # (Ray does that for single-machine clusters on macOS and Windows; this does it on Linux).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray Train's PlacementGroupCleaner asks Ray's state API every 2 s whether the run's
    # controller is alive. With no address it asks the newest cluster on the machine: once a
    # `ray start --head` runs beside this one, that cluster, which does not know the controller,
    # and the cleaner removes the run's placement group, killing its workers mid-run. This
    # cluster has no dashboard to answer anyway: an address nothing listens on makes every
    # question fail, which the cleaner takes as "unknown, keep waiting".
    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:0"
    # Ray Train's controller looks at its workers every 2 s, and a worker's report (a checkpoint,
    # an evaluation) waits until the controller has taken the one before: ~8 s of a 40 s laptop
    # run. 0.2 s costs a small local cluster nothing.
    os.environ.setdefault(CHECK_INTERVAL, LOCAL_CHECK_INTERVAL_S)
    os.environ[LOCAL_CLUSTER] = "1"
    try:
        yield
    finally:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _keep_ray_off_the_console() -> None:
    """Ray forwards every line its processes print (its own logs, Ray Train's, DeepSpeed's and
    transformers') to this console: ~100 lines a run. Only muppet-ray's own lines stay; the rest
    are in Ray's session logs, where Ray writes them anyway. (A worker's error still reaches
    this process, as the exception `fit()` raises.) Not with `--verbose`."""
    if verbose():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as forwarded

    def ours(batch: dict) -> None:
        for line in batch["lines"]:
            if "[muppet-ray]" in line:
                print(line, file=sys.stderr if batch["is_err"] else sys.stdout, flush=True)

    forwarded.remove_handler("ray_print_logs")  # (Ray's printer, added by ray.init)
    forwarded.add_handler("muppet_ray_lines", ours)
    # Ray Data, in this process, prints each execution's plan and tips at INFO (its log file
    # keeps them): errors only.
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.ERROR)
    node = ray._private.worker._global_node  # (None for a Ray Client connection)
    if node is not None:
        print(f"[muppet-ray] Ray's own log lines: {node.get_logs_dir_path()}", flush=True)


# ------------------------------------------------------------------ what it can give a run


def autoscaler_node_groups() -> list[dict[str, float]] | None:
    """The resources of each kind of node the cluster's autoscaler can add (beyond those it
    must keep); [] where it is known to add none (a local cluster); None where unknown."""
    if is_local_cluster():
        return []
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [dict(group.resources) for group in config.node_group_configs
                if group.resources and (group.max_count == -1
                                        or group.max_count > group.min_count)]
    launcher = Path(LAUNCHER_CONFIG).expanduser()
    if launcher.exists():
        types = (yaml.safe_load(launcher.read_text()) or {}).get("available_node_types") or {}
        return [dict(t.get("resources") or {}) for t in types.values()
                if t.get("max_workers", 0) > t.get("min_workers", 0)]
    return None


def use_gpu(scaling: ScalingConfig) -> tuple[bool, str]:
    """Whether the workers train on GPUs, and why: `scaling.use_gpu`, or where it is unset, GPUs
    when the cluster has them or its autoscaler can add nodes that have them."""
    if scaling.use_gpu is not None:
        return scaling.use_gpu, "scaling.use_gpu"
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True, "the cluster has GPUs"
    groups = autoscaler_node_groups()
    if any(group.get("GPU", 0) > 0 for group in groups or ()):
        return True, "the cluster's autoscaler adds nodes with GPUs"
    return False, "the cluster has no GPU" + (
        "" if groups == [] else " and its autoscaler adds none" if groups else
        ", and what its autoscaler adds is not known here (scaling.use_gpu: true for GPUs)")


def _fits(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many `bundle`s a node of `resources` holds."""
    return int(min((resources.get(k, 0) // v for k, v in bundle.items() if v > 0), default=0))


def wait_for_room(bundle: dict[str, float], count: int, timeout_s: float, what: str) -> None:
    """Return once the cluster's nodes can hold `count` workers of `bundle` (taken or free: Ray
    schedules them when free). Where they cannot yet and an autoscaler could add such nodes (or
    what it adds is not known), it is asked for them (a placement group of the workers, pending
    until they fit) and this waits, with a progress line every WAIT_LINE_EVERY_S, failing in one
    line after `timeout_s`. Where no node the cluster has or can add would do, it fails at
    once."""
    def held_now() -> int:
        return sum(_fits(node["Resources"], bundle) for node in ray.nodes() if node["Alive"])

    if held_now() >= count:
        return
    needs = f"{count} x {_resources(bundle)} for {what}"
    groups = autoscaler_node_groups()
    if groups is not None and not any(_fits(group, bundle) for group in groups):
        have = _resources(ray.cluster_resources())
        raise ConfigError(f"scaling: the run needs {needs}; the cluster has {have}"
                          + (" and no autoscaler" if not groups else
                             " and its autoscaler adds no node that holds a worker")
                          + " (fewer workers, or other scaling.resources_per_worker)")
    demand = placement_group([bundle] * count, strategy="PACK")  # (what the autoscaler reads)
    began = time.monotonic()
    try:
        while not _ready(demand, min(WAIT_LINE_EVERY_S, timeout_s)):
            waited = time.monotonic() - began
            if waited >= timeout_s:
                raise ConfigError(f"scaling.start_timeout_s: waited {waited:.0f} s for the "
                                  f"autoscaler to add nodes for {needs}; the cluster still has "
                                  f"{_resources(ray.cluster_resources())}")
            print(f"[muppet-ray] waiting for the autoscaler: {needs} ({waited:.0f} s of "
                  f"scaling.start_timeout_s={timeout_s:g})", flush=True)
    finally:
        remove_placement_group(demand)


def _ready(group, timeout_s: float) -> bool:
    ready, _ = ray.wait([group.ready()], timeout=max(timeout_s, 0.1))
    return bool(ready)


def _resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not (
        k.startswith("node:") or k in ("memory", "object_store_memory") or "_group_" in k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def warn_if_no_cpu_left(config: Config) -> None:
    """The Ray Data tasks that feed the workers hold no CPU (data.py), so a run whose workers
    take every CPU still trains; say so where that makes the stream share the workers' cores."""
    cpus = ray.cluster_resources().get("CPU", 0)
    taken = config.scaling.min_workers * config.scaling.cpus_per_worker
    if cpus - taken < 1 and not autoscaler_node_groups():
        print(f"[muppet-ray] note: the workers take {taken:g} of the cluster's {cpus:g} CPUs; "
              "the Ray Data tasks that feed them share their cores", flush=True)


def check_shared(storage: str) -> None:
    """A multi-node run needs a storage path every node sees: the workers of one run write their
    checkpoint shards there from different nodes, and a restarted worker reads them back from
    any node. A URI (s3://, gs://) is shared by nature; a local path must be on a file system
    mounted on every node (NFS), which is checked with a marker file from every node. Where the
    autoscaler can add nodes, those cannot be checked: a local path is refused."""
    if is_uri(storage):
        return
    if autoscaler_node_groups():
        raise ConfigError(f"run.storage_path: {storage!r} is a local path, and the cluster's "
                          "autoscaler adds nodes that cannot be checked to see it; use storage "
                          "every node shares (s3://, gs://)")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    os.makedirs(storage, exist_ok=True)
    marker = os.path.join(storage, f".shared-check-{uuid.uuid4().hex}")
    Path(marker).touch()
    sees = ray.remote(num_cpus=0)(os.path.exists)
    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(marker) for n in nodes])
    finally:
        os.remove(marker)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            f"run.storage_path: {storage!r} is not visible from nodes {blind}; a multi-node run "
            "needs storage all nodes share (an NFS path mounted on every node, s3://, gs://)")
