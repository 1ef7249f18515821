"""What the Ray cluster a run runs on can give it — GPUs now or once its autoscaler adds them,
room for the workers, storage every node sees (joining or starting one: runtime.py).

What nodes a cluster's autoscaler can add is read where Ray keeps it: the cluster config an
autoscaler reports to Ray (node groups with their resources and counts, runtime.cluster_config;
Ray Train and Ray Data read it for the same decisions), else the cluster launcher's own config on
the head node (`~/ray_bootstrap_config.yaml`, which Ray Tune reads to know it runs on such a
cluster; `ray job submit` runs the driver there). KubeRay's autoscaler describes its node groups
to neither: there, nodes that are not up yet are unknown (set `scaling.use_gpu: true` for GPUs).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from muppet_ray import runtime
from muppet_ray.config import Config, ScalingConfig
from muppet_ray.errors import ConfigError
from muppet_ray.storage import is_uri

WAIT_LINE_EVERY_S = 30  # a progress line while waiting for the autoscaler
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher's, on the head node

# ------------------------------------------------------------------ what it can give a run


def autoscaler_node_groups() -> list[dict[str, float]] | None:
    """The resources of each kind of node the cluster's autoscaler can add (beyond those it
    must keep); [] where it is known to add none (a local cluster); None where unknown."""
    if runtime.is_local_cluster():
        return []
    config = runtime.cluster_config()
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
