"""The hardware's yardstick: a bare PyTorch loop over a run's own micro-batches.

    python bench/bare_loop.py RUN_DIR --steps 30 [--from-step 0] [--threads 2]

Reads the micro-batches that steps [from, from + steps) of a muppet-ray run trained on, straight
from the run's chunk cache into memory (the same schedule, the same padded arrays), then trains on
them in one process with nothing else: the run's backbone, only each micro-batch's own task head,
loss / log(n), backward, AdamW once per step. No Ray, no DeepSpeed, no data loading in the loop.
Prints one JSON line: steady real and padded tokens/s (the first steps are warm-up and not
counted) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import bench_cli
import torch
import torch.nn.functional as F
import yaml

from muppet_ray import batch as mb
from muppet_ray.config import micro_batches_per_step, validate
from muppet_ray.data import DATA_RECORD, CacheIndex, ChunkReader, read_run_caches
from muppet_ray.errors import MuppetError
from muppet_ray.mixture import build_schedule
from muppet_ray.model import build_backbone
from muppet_ray.storage import RunDir
from muppet_ray.tokenizer import load_tokenizer

WARMUP_STEPS = 3


def load_micro_batches(run: RunDir, from_step: int, steps: int):
    if not (run.exists("config.yaml") and run.exists("tasks.json")):
        raise MuppetError(f"{run.root}: expected a muppet-ray run's directory (its config.yaml "
                          "and tasks.json)")
    config = validate(yaml.safe_load(run.read_text("config.yaml")))
    if from_step < 0 or from_step + steps > config.training.max_steps:
        raise MuppetError(f"steps {from_step} to {from_step + steps}: the run {run.root} has "
                          f"{config.training.max_steps} steps (training.max_steps)")
    specs = json.loads(run.read_text("tasks.json"))
    caches = [train_cache(run, s["name"]) for s in specs]
    per_step = micro_batches_per_step(config)
    schedule = build_schedule([c.chunks for c in caches], [c.examples for c in caches],
                              config.mixture, config.batching, per_step,
                              config.training.max_steps, config.training.seed,
                              [s["name"] for s in specs])
    micro_batches = []
    for p in range(from_step * per_step, (from_step + steps) * per_step):
        parts = [ChunkReader.read(caches[t], c, t)
                 for t, c in zip(schedule.task[p], schedule.chunk[p])]
        micro_batches.append(mb.merge(parts, 0))
    return config, specs, per_step, micro_batches


def train_cache(run: RunDir, task: str) -> CacheIndex:
    if run.exists(DATA_RECORD):
        return read_run_caches(run)[task]["train"]
    # (runs made before the shared chunk cache: their own data/, one chunk per row group, with
    # the task index stored in the chunk, which ChunkReader overwrites with the same value)
    raw = json.loads(run.read_text(f"data/{task}/train/index.json"))
    return CacheIndex(run.uri(f"data/{task}/train"),
                      tuple((n, tuple(g)) for n, g in raw["files"]), raw["examples"])


class BareModel(torch.nn.Module):
    """The backbone and one small head per classification task plus one multiple-choice head."""

    def __init__(self, backbone, specs):
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_size

        def head(n):
            return torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(width, width),
                                       torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(width, n))

        self.heads = torch.nn.ModuleList(
            head(max(1, s["num_outputs"])) for s in specs)
        self.choice_head = head(1)
        self.span_head = torch.nn.Linear(width, 2)

    def loss(self, batch, spec) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in batch}
        hidden = self.backbone(**inputs).last_hidden_state
        task = int(batch["example_task"][0])
        if spec["type"] == "span":  # one window per example: start and end over its tokens
            logits = self.span_head(hidden).masked_fill(~batch["attention_mask"].bool()[..., None],
                                                        -1e4)
            loss = (F.cross_entropy(logits[..., 0], batch["start"])
                    + F.cross_entropy(logits[..., 1], batch["end"])) / 2
            return loss / math.log(hidden.shape[1])
        first = hidden[:, 0]
        if spec["type"] == "regression":
            return F.mse_loss(self.heads[task](first)[:, 0].float(), batch["target"])
        if spec["type"] != "multiple_choice":
            logits = self.heads[task](first)
            n = spec["num_outputs"]
        else:
            scores = self.choice_head(first).squeeze(-1)
            owner = batch["row_example"]
            examples = len(batch["label"])
            logits = scores.new_full((examples, int(torch.bincount(owner).max())), -1e4)
            position = torch.arange(len(owner), device=owner.device) - torch.searchsorted(
                owner, owner)
            logits = logits.index_put((owner, position), scores)
            n = logits.shape[1]
        return F.cross_entropy(logits, batch["label"]) / math.log(max(n, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--from-step", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps, threads=args.threads)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    run = RunDir(args.run_dir)
    config, specs, per_step, micro_batches = load_micro_batches(run, args.from_step, args.steps)
    tokenizer = load_tokenizer(run.uri("tokenizer"))
    model = BareModel(build_backbone(config.model, tokenizer), specs).to(device)
    # Dropout on, as the run trains: a pretrained backbone comes from `from_pretrained` in eval
    # mode, and was measured so until issue 24 (no dropout, and PyTorch's fast attention kernel,
    # which attention dropout rules out on CPUs: 1.55x the tokens/s of the same loop trained).
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.learning_rate,
                                  fused=device.type == "cuda")
    batches = [{k: (torch.from_numpy(v).long() if v.dtype.kind in "iu" else
                    torch.from_numpy(v)).to(device)
                for k, v in b.items() if k not in mb.TEXT_KEYS} for b in micro_batches]
    tokens, padded, seconds, squares = 0, 0, 0.0, 0
    for step in range(args.steps):
        start = time.perf_counter()
        step_tokens = step_padded = step_squares = 0
        for batch in batches[step * per_step:(step + 1) * per_step]:
            spec = specs[int(batch["example_task"][0])]
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss = model.loss(batch, spec)
            (loss / per_step).backward()
            step_tokens += int(batch["attention_mask"].sum())
            step_padded += batch["attention_mask"].numel()
            step_squares += int((batch["attention_mask"].sum(1) ** 2).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= WARMUP_STEPS:
            tokens += step_tokens
            padded += step_padded
            squares += step_squares
            seconds += time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    print(json.dumps({"steps": args.steps - WARMUP_STEPS, "tokens_per_s": tokens / seconds,
                      "padded_tokens_per_s": padded / seconds, "peak_rss_mb": peak_mb,
                      "gpu_peak_mb": gpu_mb,
                      # (attention's work per real token grows with its row's length)
                      "attention_row_tokens": squares / max(tokens, 1)}))


if __name__ == "__main__":
    bench_cli.run(main)
