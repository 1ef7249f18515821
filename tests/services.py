"""Real services the tests start on this machine: an S3-protocol server (moto's, in this process,
on 127.0.0.1) and a multi-node Ray cluster (`ray start`: a head and worker nodes, each on a
loopback address of its own).

Nodes share nothing but storage, as on a cloud cluster: each worker node runs in a mount
namespace of its own where a fresh tmpfs covers the scratch path that every process uses as its
temporary directory (TMPDIR) and Ray's. A file one node writes there is not there on another, so
code that hands a local path from one process to another on another node fails. (Where mount
namespaces are not allowed — not root — each node gets a scratch directory of its own instead.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
SECRET = "s3cr3t-" + uuid.uuid4().hex[:12]  # the server's secret key: must never be written
BUCKET = "muppet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1 with one bucket; yields the environment that points boto3,
    pyarrow and s3fs at it (AWS_ENDPOINT_URL and credentials), as a user's would."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (a line per request otherwise)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "muppet-test",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env[
        "AWS_ACCESS_KEY_ID"], secret_key=SECRET, region="us-east-1",
        allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield env
    finally:
        server.stop()


def can_mount_namespaces() -> bool:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t",
                           "tmpfs", "tmpfs", "/mnt"], capture_output=True).returncode == 0


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the node: its raylet, its workers, everything it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


@dataclass
class MultiNodeCluster:
    address: str  # the head's GCS address (RAY_ADDRESS for drivers)
    scratch: str  # every process's temporary directory (a node's own in its namespace)
    env: dict  # what a driver on the head's machine runs with
    nodes: list[Node] = field(default_factory=list)
    private: bool = False  # worker nodes' scratch in mount namespaces of their own

    def driver_env(self, **extra: str) -> dict:
        return {**self.env, "RAY_ADDRESS": self.address, **extra}


# Ray gives up on a dead node and a worker group that cannot start after about a minute by
# default; tests need not wait that long.
FAST_NODE_DEATH = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'


@contextlib.contextmanager
def multinode_cluster(env: dict, workers: int, log_dir: Path, head_cpus: int = 2,
                      worker_cpus: int = 2, worker_resources: str = '{"trainer": 1}'):
    """A head and `workers` worker nodes, started with `ray start --block` on 127.0.0.1 with
    `env` (storage credentials, ...); each worker node holds `worker_resources` (one training
    worker each). Yields a MultiNodeCluster; every node is killed on leaving."""
    scratch = f"/tmp/mr-{uuid.uuid4().hex[:8]}"  # (short: Ray's socket paths live below it)
    private = can_mount_namespaces()
    os.makedirs(f"{scratch}/tmp", exist_ok=True)
    common = {**env, "TMPDIR": f"{scratch}/tmp", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
              "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
              # (no dashboard here: Ray Train's placement-group cleaner then keeps waiting,
              # instead of asking another cluster on this machine about this one's runs)
              "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:0", "RAY_DEDUP_LOGS": "0",
              "RAY_AUTH_MODE": "token"}  # (as Ray 2.60 starts a cluster: the token in ~/.ray)
    port = free_port()
    # Each node its own loopback address (127.0.0.2, .3, ...): Ray keeps it as the node's address
    # (127.0.0.1 it would replace by the machine's routable one), so the nodes talk over loopback.
    cluster = MultiNodeCluster(f"127.0.0.2:{port}", scratch, common, private=private)

    def start(name: str, args: list[str], own_scratch: bool) -> Node:
        node_scratch = scratch if private or not own_scratch else f"{scratch}/{name}"
        ports = [f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        command = [RAY, "start", "--block", f"--node-ip-address=127.0.0.{len(cluster.nodes) + 2}",
                   f"--temp-dir={node_scratch}/ray", "--disable-usage-stats", *ports, *args]
        if own_scratch and private:
            # a fresh tmpfs over the scratch path, seen by this node's processes only
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs -o size=4g tmpfs {scratch} && mkdir -p {scratch}/tmp '
                       f'&& exec "$@"', "sh", *command]
        else:
            os.makedirs(f"{node_scratch}/tmp", exist_ok=True)
        log = log_dir / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command, env={**os.environ, **common,
                                                     "TMPDIR": f"{node_scratch}/tmp"},
                                       stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, log)
        cluster.nodes.append(node)
        return node

    try:
        start("head", ["--head", f"--port={port}", "--include-dashboard=false",
                       f"--ray-client-server-port={free_port()}", f"--num-cpus={head_cpus}",
                       f"--system-config={FAST_NODE_DEATH}"], own_scratch=False)
        _wait_for_nodes(cluster, 1)
        for i in range(workers):
            start(f"worker{i + 1}", [f"--address={cluster.address}", f"--num-cpus={worker_cpus}",
                                     f"--resources={worker_resources}"], own_scratch=True)
        _wait_for_nodes(cluster, 1 + workers)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            node.kill()
        subprocess.run(["rm", "-rf", scratch], check=False)


def _wait_for_nodes(cluster: MultiNodeCluster, count: int, timeout: float = 120) -> None:
    probe = ("import ray; ray.init(logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([sys.executable, "-c", probe], env={
            **os.environ, **cluster.driver_env()}, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and int(done.stdout.strip().splitlines()[-1]) >= count:
            return
        dead = [n for n in cluster.nodes if n.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"{n.name}: {n.log.read_text()[-1500:]}" for n in cluster.nodes)
            raise RuntimeError(f"the cluster did not reach {count} nodes:\n{done.stderr[-1500:]}"
                               f"\n{logs}")
        time.sleep(1)
