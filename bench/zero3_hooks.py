"""ZeRO-3's host overhead, apart from compute: what its per-module hooks cost on a model's shape.

    python bench/zero3_hooks.py [--layers 24] [--hidden 64] [--tokens 16] [--steps 12]

On one GPU ZeRO-3 ran the large encoder at 0.42 of ZeRO-2's tokens/s (issue 24) although it has
no one to share parameters with: what it adds is host work, ZeRO-3's fetch and release around
every module, forward and backward. This measures that work on the CPU: a BERT with the depth and
modules of the model in question but a tiny hidden size and a few tokens, so that compute is
negligible and what remains is framework time. One process, one thread, world size 1 (gloo),
muppet-ray's own DeepSpeed config (optim.deepspeed_config) and its one reduction per step
(train.one_reduction). Variants: ZeRO-2; ZeRO-3 as DeepSpeed does it by default (hooks on every
module), also with every weight kept whole (a persistence threshold above the largest);
ZeRO-3 with each encoder layer fetched and freed as one unit (engine.fetch_layers_whole, what
muppet-ray runs), also with transformers' `auto` buffer sizes (h^2 gradient buckets, 0.9 h^2
prefetch). Weights of fewer than 10 h numbers (biases, norms) are kept whole, as DeepSpeed's
default threshold of 1e5 keeps them in a large encoder while it gathers every matrix. Prints
milliseconds of host time per micro-batch and per step, and the extra over ZeRO-2. On a GPU the
hooks also wait on streams and events, so these figures are a lower bound of what they cost
there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import bench_cli
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=4, help="per optimizer step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_cli.positive(layers=args.layers, hidden=args.hidden, tokens=args.tokens,
                       micro_batches=args.micro_batches, steps=args.steps, repeats=args.repeats)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"),
                        ("DS_ACCELERATOR", "cpu")):
        os.environ.setdefault(name, value)
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    h = args.hidden
    transformers_auto = {"reduce_bucket_size": h * h,
                         "stage3_prefetch_bucket_size": int(0.9 * h * h)}
    variants = [
        ("ZeRO-2", 2, {}),
        ("ZeRO-3, hooks on every module", 3, {"per_module": True}),
        ("ZeRO-3, hooks on every module, all weights kept", 3,
         {"per_module": True, "stage3_param_persistence_threshold": 10**9}),
        ("ZeRO-3, layers fetched whole (muppet-ray)", 3, {}),
        ("ZeRO-3, layers whole, transformers' auto buffers", 3, transformers_auto),
    ]
    rows = []
    for _ in range(args.repeats):  # (interleaved: drift on a shared machine hits every variant)
        for label, stage, extra in variants:
            rows.append((label, *measure(args, stage, dict(extra))))
    print(f"\nBERT {args.layers} layers x hidden {args.hidden}, {args.tokens} tokens, "
          f"{args.micro_batches} micro-batches a step, {args.steps} steps, "
          f"median of {args.repeats}; torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print(f"{'variant':<46} {'ms/micro-batch':>15} {'ms/step':>9} {'extra ms/micro-batch':>21}")
    base = None
    for label, *_ in variants:
        micro = statistics.median(r[1] for r in rows if r[0] == label)
        step = statistics.median(r[2] for r in rows if r[0] == label)
        base = micro if base is None else base
        print(f"{label:<46} {micro:>15.1f} {step:>9.1f} {micro - base:>21.1f}")


def measure(args, stage: int, extra: dict) -> tuple[float, float]:
    import deepspeed
    from transformers import BertConfig, BertModel

    from muppet_ray.config import load_config
    from muppet_ray.engine import fetch_layers_whole
    from muppet_ray.optim import build_optimizer, deepspeed_config
    from muppet_ray.train import one_reduction

    torch.manual_seed(0)
    backbone = BertModel(BertConfig(
        vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=64))
    model = Classifier(backbone, args.hidden)
    if stage == 3 and not extra.pop("per_module", False):
        fetch_layers_whole(model, deepspeed)
    config = load_config(None, [f"deepspeed.zero_stage={stage}", "training.max_steps=1000"])
    ds = deepspeed_config(config, 1, False, stage)
    if stage == 3:
        # DeepSpeed keeps weights of fewer than 1e5 numbers whole on every worker: in a large
        # encoder that is its biases and norms, while every matrix is gathered and freed. At this
        # width the matrices are that small too: the same split, scaled to the width.
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10 * args.hidden
    ds["zero_optimization"].update(extra)
    optimizer, scheduler = build_optimizer(model, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds)
    ids = torch.randint(5, 512, (1, args.tokens))
    labels = torch.zeros(1, dtype=torch.long)
    micro, steps = [], []
    for step in range(args.steps + 2):  # (two warm-up steps)
        began = time.perf_counter()
        with one_reduction(engine, stage):
            for _ in range(args.micro_batches):
                started = time.perf_counter()
                loss = engine(ids, labels)
                engine.backward(loss)
                if step >= 2:
                    micro.append(time.perf_counter() - started)
        engine.step()
        if step >= 2:
            steps.append(time.perf_counter() - began)
    engine.destroy()
    return 1000 * statistics.median(micro), 1000 * statistics.median(steps)


class Classifier(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, hidden: int):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(hidden, 2)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        first = self.backbone(input_ids=ids).last_hidden_state[:, 0]
        return torch.nn.functional.cross_entropy(self.head(first), labels)


if __name__ == "__main__":
    main()
