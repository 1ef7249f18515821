"""Fault injection, for the tests of recovery: `run.fail_at_step` SIGKILLs worker
`run.fail_rank` once per run when it reaches that step — at a checkpoint step, halfway through
uploading that checkpoint; `run.fail_node_at_step` has the last worker SIGKILL its node's raylet
(the node is lost). The worker attaches a FaultInjection (a training-loop callback) only when a
setting is given."""

from __future__ import annotations

import logging
import os
import signal
import time

import ray.train

from muppet_ray.callbacks import Callback
from muppet_ray.checkpoint import step_of
from muppet_ray.config import Config
from muppet_ray.storage import RunDir

MARKER = ".fault_injected"  # in the run directory, once the fault has struck
NODE_MARKER = ".node_fault_injected"
log = logging.getLogger("muppet_ray")


class FaultInjection(Callback):
    def __init__(self, config: Config, run_dir: RunDir, rank: int, world: int):
        self.step, self.node_step = config.run.fail_at_step, config.run.fail_node_at_step
        self.checkpoint_every = config.training.checkpoint_every
        self.mine = rank == min(config.run.fail_rank, world - 1)
        self.last = rank == world - 1
        self.run_dir, self.rank = run_dir, rank
        self.uploading = False  # the upload that dies is under way (checkpoints upload async)

    def due(self, step: int) -> bool:
        return self.mine and step == self.step and not self.run_dir.exists(MARKER)

    def before_step(self, step: int) -> None:
        if self.due(step) and not self.uploading:
            self.die(step, "")
        if self.last and step == self.node_step and not self.run_dir.exists(NODE_MARKER):
            self.wait_for_checkpoint(step)
            self.run_dir.write_text(NODE_MARKER, f"node of worker {self.rank} killed at step "
                                                 f"{step}\n")
            log.warning(f"[muppet-ray] fault injection: the node of worker {self.rank} killed "
                        f"at step {step}")
            os.kill(os.getppid(), signal.SIGKILL)  # (a worker's parent is its node's raylet)
            # This worker waits for its end (Ray ends a worker whose raylet is gone): left to
            # train on, it once saved a checkpoint first. (Killing it, or failing its training
            # function, made Ray Train take a minute longer to restart.)
            time.sleep(600)

    def checkpoint_upload(self, step: int):
        """Ray Train's `checkpoint_upload_fn` for the checkpoint of `step`: None (Ray Train's
        own upload), or one that uploads half of this worker's files, then the first half of
        the next one's bytes, and dies."""
        if not self.due(step):
            return None
        self.uploading = True  # (it runs beside the next steps: they must not die first)

        def upload(checkpoint: ray.train.Checkpoint, name: str):
            files = sorted(os.path.relpath(os.path.join(root, f), checkpoint.path)
                           for root, _, names in os.walk(checkpoint.path) for f in names)
            cut = files[len(files) // 2]
            for relative in files[:len(files) // 2] + [cut]:
                with open(os.path.join(checkpoint.path, relative), "rb") as f:
                    data = f.read()
                self.run_dir.write_bytes(f"{name}/{relative}",
                                         data[:len(data) // 2] if relative == cut else data)
            self.die(step, f" while uploading {name} ({cut} cut short)")
        return upload

    def die(self, step: int, how: str) -> None:
        """SIGKILL, once the latest checkpoint before this step is registered."""
        self.wait_for_checkpoint(step)
        self.run_dir.write_text(MARKER, f"worker {self.rank} killed at step {step}{how}\n")
        log.warning(f"[muppet-ray] fault injection: worker {self.rank} killed at step {step}{how}")
        os.kill(os.getpid(), signal.SIGKILL)

    def wait_for_checkpoint(self, step: int) -> None:
        """Wait (up to a minute) until Ray Train has registered the latest checkpoint before
        `step`, which it does on its next poll of the workers, so that the restart resumes from
        it."""
        latest = (step - 1) // self.checkpoint_every * self.checkpoint_every
        deadline = time.monotonic() + 60
        while latest and time.monotonic() < deadline and latest not in {
                step_of(name) for name in self.run_dir.registered_checkpoints()}:
            time.sleep(0.5)
