"""Not speed: could a run resized from 2 workers to 1 compute what the uninterrupted run computes,
bit for bit? (What an online mixture's decisions after an elastic resize would need to replay
the uninterrupted run's micro-batches: docs/design.md "Online mixing".)

    python bench/resize_exactness.py [--steps 20]

The same steps of 2 micro-batches, through `build_engine` (DeepSpeed on the CPU, gloo): 2
workers with one micro-batch each, then 1 worker with both; a small RoBERTa with dropout 0.1,
AdamW at lr 1e-3. Dropout seeded as train.py seeds it (from the seed, the step and the worker)
or from the micro-batch's position alone. Prints, for each variant, how many weight tensors
differ after the last step and the first step whose micro-batch losses differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import bench_cli
import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (tests' helpers)
from tests.services import free_port  # noqa: E402

VARIANTS = [  # (ZeRO stage, gradient clipping, dropout seeded per)
    (2, 1.0, "step and worker"), (2, 1.0, "micro-batch"), (2, 0.0, "micro-batch"),
    (0, 1.0, "step and worker"), (0, 1.0, "micro-batch")]
PER_STEP = 2


def worker(rank: int, world: int, port: int, out: str, steps: int, stage: int, clip: float,
           seeding: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from muppet_ray import batch as mb
    from muppet_ray.engine import build_engine
    from muppet_ray.train import one_reduction
    from muppet_ray.workers import Workers
    from tests.conftest import make_config
    from tests.test_accumulation import TASKS, micro_batches
    from tests.test_task_types import suite_tokenizer, task

    tokenizer = suite_tokenizer()
    config = make_config(tempfile.mkdtemp(), "model.arch=roberta", "scaling.num_workers=[1, 2]",
                         f"deepspeed.zero_stage={stage}", f"training.grad_clip={clip}",
                         "training.learning_rate=1e-3", "training.warmup_steps=0")
    engine, _ = build_engine(config, tokenizer, [task(n).layout() for n in TASKS],
                             Workers(rank, world, world, torch.device("cpu")))
    batches, accum, losses = micro_batches(tokenizer), PER_STEP // world, {}

    def seed(*key: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([0, *key]).generate_state(1)[0]))

    for step in range(steps):
        if seeding == "step and worker":
            seed(step, rank)
        with one_reduction(engine, stage):
            for micro in range(accum):
                position = step * PER_STEP + rank * accum + micro
                if seeding == "micro-batch":
                    seed(position)
                result = engine(mb.to_torch(batches[position % len(batches)], torch.device("cpu")))
                engine.backward(result["loss"] / accum)
                losses[position] = result["loss"].item()
        engine.step()
    torch.save(losses, f"{out}/losses-{world}-{rank}.pt")
    if rank == 0:
        torch.save({k: v.clone() for k, v in engine.module.state_dict().items()},
                   f"{out}/weights-{world}.pt")


def compare(steps: int, stage: int, clip: float, seeding: str) -> tuple[int, int, str]:
    out = tempfile.mkdtemp(prefix="muppet-resize-")
    for world in (2, 1):
        mp.spawn(worker, args=(world, free_port(), out, steps, stage, clip, seeding),
                 nprocs=world)
    two, one = (torch.load(f"{out}/weights-{w}.pt") for w in (2, 1))
    differing = sum(not torch.equal(two[k], one[k]) for k in two)
    losses_two = {**torch.load(f"{out}/losses-2-0.pt"), **torch.load(f"{out}/losses-2-1.pt")}
    losses_one = torch.load(f"{out}/losses-1-0.pt")
    first = next((p // PER_STEP for p in sorted(losses_one) if losses_one[p] != losses_two[p]),
                 None)
    return differing, len(two), "none" if first is None else str(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps)
    print("| ZeRO | clipping | dropout seeded per | weight tensors differing | first step "
          "whose losses differ |\n|---|---|---|---|---|")
    for stage, clip, seeding in VARIANTS:
        differing, total, first = compare(args.steps, stage, clip, seeding)
        print(f"| {stage} | {clip} | {seeding} | {differing} of {total} | {first} |", flush=True)


if __name__ == "__main__":
    bench_cli.run(main)
