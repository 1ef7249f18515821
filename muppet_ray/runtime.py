"""muppet-ray's one place for how it uses Ray and DeepSpeed beyond their public API: starting or
joining Ray (a local cluster's settings scoped to its processes), keeping Ray's lines off the
console, the environment changes other modules ask for, and every private Ray or DeepSpeed name
relied on — each listed in PRIVATE and checked when Ray starts, so that a Ray that moved one
fails at once, in one line naming it, not in the middle of a run."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
from typing import Any

import ray

from muppet_ray.config import VERBOSE, Config
from muppet_ray.errors import ConfigError

# Ray's private names muppet-ray relies on (tested with ray 2.60.0), module -> name.
PRIVATE = {
    "ray._private.ray_constants": "ENABLE_RAY_CLUSTER",  # a local cluster on loopback only
    "ray._private.ray_logging": "global_worker_stdstream_dispatcher",  # the console filter
    "ray._private.log": "PlainRayHandler",  # Ray Data's console handler
    "ray._private.worker": "_global_node",  # where Ray's session logs are
    "ray._private.state": "state",  # the autoscaler's cluster config (cluster.py)
    "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator":
        "get_or_create_autoscaling_coordinator",  # pinned to the driver's node
    "ray.data._internal.execution.backpressure_policy":
        "ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY",  # the training stream's segments (data.py)
}
# DeepSpeed's optimizer attribute that one reduction per step needs (train.one_reduction).
DEEPSPEED_COALESCE = "_coalesce_grad_reduction"


def private(module: str, name: str) -> Any:
    """`module.name` (one of PRIVATE), or a one-line error naming what moved."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise RuntimeError(
            f"muppet-ray relies on {module}.{name}, which ray {ray.__version__} does not have "
            "(muppet-ray is tested with ray 2.60.0: install that version)") from None


def cluster_config():
    """The cluster config an autoscaler reported to Ray (its node groups), or None."""
    return private("ray._private.state", "state").get_cluster_config()


def without_backpressure(context) -> None:
    """A Ray Data context whose dataset produces its blocks at once (no backpressure)."""
    context.set_config(private("ray.data._internal.execution.backpressure_policy",
                               "ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY"), [])


def check_private_names() -> None:
    for module, name in PRIVATE.items():
        private(module, name)


def reduces_once_per_step(optimizer) -> bool:
    """Whether DeepSpeed's ZeRO optimizer can hold its gradient reduction until a step's end."""
    return hasattr(optimizer, DEEPSPEED_COALESCE)


# ------------------------------------------------------------------- environment changes


def set_verbose() -> None:
    """`--verbose`, for this process and those it starts (Tune trials inherit it)."""
    os.environ[VERBOSE] = "1"


def quiet_tune_console() -> None:
    """Tune's default console engine prints its configuration box even at verbose=0; the legacy
    one prints nothing at 0 (the trials' own progress lines still show)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def trials_keep_working_directory() -> None:
    """Tune runs each trial in a directory of its own unless told not to, where a relative path
    in the trial's config (a task's file, a local model) would resolve. Trials keep the working
    directory of the cluster's workers instead: where the sweep started its local cluster, or
    the job's working_dir under `ray job submit`. (Tune passes this on to its trials.)"""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"


def use_deepspeed_accelerator(on_gpu: bool) -> None:
    """DeepSpeed picks its accelerator when first imported: CUDA, or the CPU (gloo)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")


# oneDNN, which runs some of PyTorch's CPU kernels (BERT's GELU among them), builds a JIT-compiled
# primitive for every input shape and keeps up to 1,024 of them. Micro-batches come in a new shape
# almost every pass, so primitives are made and kept mid-pass, among the activations: they pin
# glibc's heap, which then keeps growing instead of reusing the activations' freed memory (issue
# 24: a MiniLM worker's resident memory 2.8 GB at step 20, 7.2 GB at step 200). oneDNN reads the
# capacity when it first builds a primitive; without a cache it builds one per call, at no
# measurable cost on the CPU (bench/README.md, worker memory).
ONEDNN_CACHE_CAPACITY = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def no_cpu_kernel_cache() -> None:
    """No oneDNN primitive cache in this process, unless its environment already sets one: call it
    before the first forward pass on the CPU."""
    os.environ.setdefault(ONEDNN_CACHE_CAPACITY, "0")


# Ray Train's controller checks its workers this often (seconds), read from the environment. On a
# local cluster muppet-ray lowers Ray's 2 s default (see local_cluster_environment).
CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_CHECK_INTERVAL_S = "0.2"
# Set in the local cluster's processes (and so in Tune trials there): no autoscaler can add nodes.
LOCAL_CLUSTER = "MUPPET_LOCAL_CLUSTER"
_started_here = False  # this process started the local cluster it is connected to


def verbose() -> bool:
    """`--verbose`: the console shows what Ray and the libraries print, not only our lines."""
    return os.environ.get(VERBOSE) == "1"


# ----------------------------------------------------------------------- starting Ray


def start_ray(config: Config) -> None:
    """Join `run.ray_address` (or RAY_ADDRESS), else start a local cluster for this process."""
    _check_interval_setting()
    check_private_names()
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
    private("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
            "get_or_create_autoscaling_coordinator")()


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
    constants = importlib.import_module("ray._private.ray_constants")
    cluster_flag = private("ray._private.ray_constants", "ENABLE_RAY_CLUSTER")
    # One machine: listen on the loopback address only, not on the machine's routable one
    # (Ray does that for single-machine clusters on macOS and Windows; this does it on Linux).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants.ENABLE_RAY_CLUSTER = False
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
        constants.ENABLE_RAY_CLUSTER = cluster_flag
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
    forwarded = private("ray._private.ray_logging", "global_worker_stdstream_dispatcher")

    def ours(batch: dict) -> None:
        for line in batch["lines"]:
            if "[muppet-ray]" in line:
                print(line, file=sys.stderr if batch["is_err"] else sys.stdout, flush=True)

    forwarded.remove_handler("ray_print_logs")  # (Ray's printer, added by ray.init)
    forwarded.add_handler("muppet_ray_lines", ours)
    # Ray Data, in this process, prints each execution's plan and tips at INFO (its log file
    # keeps them): errors only.
    plain_handler = private("ray._private.log", "PlainRayHandler")
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, plain_handler):
            handler.setLevel(logging.ERROR)
    node = private("ray._private.worker", "_global_node")  # (None for a Ray Client connection)
    if node is not None:
        print(f"[muppet-ray] Ray's own log lines: {node.get_logs_dir_path()}", flush=True)
