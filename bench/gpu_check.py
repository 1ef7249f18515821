"""Device check: the model, its heads and DeepSpeed in bf16 on one GPU, without Ray.

    python bench/gpu_check.py [--steps 300] [--zero-stage 2]

For a GPU machine that lacks Ray (its wheel is too large to carry to the lent device machines):
the built-in suite's chunks are collated in-process by the same code Ray Data runs, then the
run's schedule, model, optimizer and DeepSpeed config train on one GPU with heterogeneous
micro-batches, and every task is evaluated before and after. Prints the metrics table, the
parameter dtype and the throughput. Exits non-zero if the loss does not fall.
"""

from __future__ import annotations

import argparse
import os
import time

import bench_cli
import torch

from muppet_ray import batch as mb
from muppet_ray import suite
from muppet_ray.config import load_config
from muppet_ray.mixture import build_schedule
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.optim import build_optimizer, deepspeed_config
from muppet_ray.task_types import TASK_TYPES, Limits
from muppet_ray.tasks import builtin_task
from muppet_ray.tokenizer import texts_of, train_tokenizer


def chunks(task, index, split, tokenizer, limits, size):
    rows = task.source.sample(split, task.source.num_examples(split))
    features = task.task_type.featurize(task, rows, tokenizer, limits)
    return [mb.collate(features[i:i + size], index, tokenizer.pad_token_id,
                       keep_text=split == "validation")
            for i in range(0, len(features), size)]


def evaluate(engine, batches, specs, device):
    engine.eval()
    stats = sum(engine.module.evaluate(mb.to_torch(b, device)).double().cpu() for b in batches)
    engine.train()
    return {s["name"]: TASK_TYPES[s["type"]].finalize(stats[i].numpy())
            for i, s in enumerate(specs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    on_gpu = torch.cuda.is_available()  # (without one: an fp32 dry run on the CPU)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    deepspeed.init_distributed()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    config = load_config(None, [f"training.max_steps={args.steps}",
                                f"deepspeed.zero_stage={args.zero_stage}"])
    tasks = [builtin_task(name, config) for name in suite.DEFAULT_MIXTURE]
    tokenizer = train_tokenizer(
        texts_of(e for t in suite.SUITE for e in builtin_task(t, config).source.sample(
            "train", 500)), config.model.vocab_size, config.model.max_length)
    limits = Limits(config.model.max_length, config.model.max_target_length,
                    config.model.doc_stride)
    started = time.perf_counter()
    train = [chunks(t, i, "train", tokenizer, limits, config.batching.micro_batch_size)
             for i, t in enumerate(tasks)]
    validation = [b for i, t in enumerate(tasks) for b in chunks(
        t, i, "validation", tokenizer, limits, config.batching.eval_batch_size)]
    print(f"collated in {time.perf_counter() - started:.1f}s")
    schedule = build_schedule([len(c) for c in train],
                              [t.source.num_examples("train") for t in tasks], config.mixture,
                              config.batching, config.batching.grad_accum_steps, args.steps,
                              config.training.seed)

    torch.manual_seed(config.training.seed)
    specs = [t.spec() for t in tasks]
    model = MuppetModel(build_backbone(config.model, tokenizer), specs, config.model.dropout,
                        config.training.loss_scaling, config.model.max_target_length, tokenizer)
    optimizer, scheduler = build_optimizer(model, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(config, 1, on_gpu, args.zero_stage))
    dtype = next(engine.module.parameters()).dtype
    before = evaluate(engine, validation, specs, device)

    losses, examples = [], 0
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for position in range(len(schedule)):
        chunk = train[schedule.task[position, 0]][schedule.chunk[position, 0]]
        out = engine(mb.to_torch(chunk, device))
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].detach())
        examples += mb.num_examples(chunk)
    synchronize()
    seconds = time.perf_counter() - started
    after = evaluate(engine, validation, specs, device)

    losses = torch.stack(losses).float().cpu()
    first, last = losses[:20].mean().item(), losses[-20:].mean().item()
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"\n{name}, DeepSpeed ZeRO-{args.zero_stage}, "
          f"parameters {dtype}, {args.steps} steps")
    print(f"loss {first:.4f} -> {last:.4f}; {examples / seconds:,.0f} examples/s "
          f"({len(schedule) / seconds:,.1f} micro-batches/s)")
    print(f"{'task':<14} {'metric':<9} {'before':>7} {'after':>7}")
    for task in tasks:
        metric = task.task_type.metric
        print(f"{task.name:<14} {metric:<9} {before[task.name][metric]:>7.3f} "
              f"{after[task.name][metric]:>7.3f}")
    if last >= first or (on_gpu and dtype != torch.bfloat16):
        raise SystemExit("FAILED: expected bf16 parameters and a falling loss")


if __name__ == "__main__":
    main()
