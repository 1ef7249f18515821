"""An elastic pre-finetuning run on a two-node Ray cluster on this machine (tests/test_cluster.py).

Each node advertises one "trainer" resource and each worker needs it, so the run starts with one
worker per node. After the first checkpoint node B is removed, killing its worker: the run
restarts from that checkpoint with the one worker left (scaling.num_workers=[1, 2]) and finishes.
Prints one JSON line: the run directory, the step at which the node went, whether it finished.

    python tests/scenarios/two_nodes.py STORAGE
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_config  # noqa: E402

from muppet_ray.prefinetune import CHECK_INTERVAL, LOCAL_CHECK_INTERVAL_S, prefinetune  # noqa: E402

# Ray's defaults take about a minute to give up on the dead node and on a worker group that
# cannot start there; tests need not wait that long.
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
os.environ[CHECK_INTERVAL] = LOCAL_CHECK_INTERVAL_S  # (as on a local cluster)
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def main(storage: str) -> None:
    node = {"num_cpus": 3, "resources": {"trainer": 1}}  # 1 CPU trains, the rest feed it data
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node, "_system_config": FAST_NODE_DEATH})
    node_b = cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    config = make_config(
        storage, "scaling.num_workers=[1, 2]", "scaling.resources_per_worker={trainer: 1}",
        "training.max_steps=32", "training.checkpoint_every=8", "run.max_failures=3",
        "run.keep_checkpoints=8")
    run_dir = Path(storage) / "run"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=prefinetune(config)))
    thread.start()

    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint record
    deadline = time.monotonic() + 300
    while not (snapshot.exists() and "checkpoint_000008" in snapshot.read_text()):
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the run never registered its first checkpoint")
        time.sleep(0.5)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cluster.remove_node(node_b, allow_graceful=False)
    thread.join(timeout=600)
    print(json.dumps({"run_dir": str(run_dir), "finished": "result" in outcome,
                      "removed_after_step": max(r["step"] for r in logged)}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
