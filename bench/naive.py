"""The naive alternative: one process, plain PyTorch, the tokenizer called on the fly.

    python bench/naive.py --shared ../shared --steps 100

What a user would write instead of muppet-ray for the same work: the MiniLM encoder, every
BIG-bench classification and multiple-choice task of `<shared>/data/bigbench`, a head per
classification task and one shared multiple-choice head on the first token, loss / log(n),
examples-proportional heterogeneous steps (each micro-batch one task, `--accum` per step), AdamW,
and validation accuracy on at most `--eval-examples` per task before and after. bench/throughput.py
times it end to end against the `muppet-ray prefinetune` command doing the same.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import bench_cli
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer


def load_tasks(shared: Path, seed: int = 0) -> list[dict]:
    tasks = []
    for path in sorted((shared / "data/bigbench").rglob("task.json")):
        examples = json.loads(path.read_text())["examples"]
        if "target_scores" not in examples[0]:
            continue  # (generation)
        choice_sets = {tuple(e["target_scores"]) for e in examples}
        rows = []
        for e in examples:
            choices = list(e["target_scores"])
            best = max(choices, key=e["target_scores"].get)
            rows.append((e["input"].strip(), choices, choices.index(best)))
        random.Random(seed).shuffle(rows)
        cut = max(1, len(rows) // 10)
        tasks.append({"name": str(path.parent.relative_to(shared / "data/bigbench")),
                      "choice": len(choice_sets) > 1, "labels": len(next(iter(choice_sets))),
                      "validation": rows[:cut], "train": rows[cut:]})
    return tasks


class Model(torch.nn.Module):
    def __init__(self, path: str, tasks: list[dict]):
        super().__init__()
        self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        width = self.encoder.config.hidden_size

        def head(n):
            return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(width, n))

        self.heads = torch.nn.ModuleList(head(1 if t["choice"] else t["labels"]) for t in tasks)
        self.choice_head = head(1)

    def forward(self, task_index: int, task: dict, encoded, num_choices: list[int]):
        first = self.encoder(**encoded).last_hidden_state[:, 0]
        if not task["choice"]:
            return self.heads[task_index](first)
        scores = self.choice_head(first).squeeze(-1).split(num_choices)
        width = max(num_choices)
        return torch.stack([F.pad(s, (0, width - len(s)), value=-1e4) for s in scores])


def encode(tokenizer, task: dict, rows, max_length: int):
    if task["choice"]:
        firsts = [text for text, choices, _ in rows for _ in choices]
        seconds = [c for _, choices, _ in rows for c in choices]
        encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
        num_choices = [len(choices) for _, choices, _ in rows]
    else:
        encoded = tokenizer([text for text, _, _ in rows], truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
        num_choices = []
    labels = torch.tensor([label for _, _, label in rows])
    return encoded, num_choices, labels


@torch.no_grad()
def evaluate(model, tokenizer, tasks, max_examples: int, max_length: int) -> float:
    model.eval()
    accuracies = []
    for i, task in enumerate(tasks):
        rows = task["validation"][:max_examples]
        correct = 0
        for start in range(0, len(rows), 32):
            encoded, num_choices, labels = encode(tokenizer, task, rows[start:start + 32],
                                                  max_length)
            correct += int((model(i, task, encoded, num_choices).argmax(-1) == labels).sum())
        accuracies.append(correct / len(rows))
    model.train()
    return sum(accuracies) / len(accuracies)


def main() -> None:
    began = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_cli.positive(steps=args.steps, micro_batch=args.micro_batch, accum=args.accum,
                       max_length=args.max_length, eval_examples=args.eval_examples,
                       threads=args.threads)
    shared = Path(args.shared)
    model_path = str(shared / "models/all-MiniLM-L6-v2")
    tasks = load_tasks(shared)
    if not tasks or not Path(model_path).is_dir():
        bench_cli.fail(f"--shared {shared}: expected data/bigbench/*/task.json and "
                       "models/all-MiniLM-L6-v2 below it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = Model(model_path, tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    before = evaluate(model, tokenizer, tasks, args.eval_examples, args.max_length)
    sizes = [len(t["train"]) for t in tasks]
    orders = [rng.sample(range(n), n) for n in sizes]
    cursors = [0] * len(tasks)
    tokens, step_times = 0, []
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(args.accum):
            i = rng.choices(range(len(tasks)), weights=sizes)[0]  # examples-proportional
            task = tasks[i]
            picks = [orders[i][(cursors[i] + k) % sizes[i]] for k in range(args.micro_batch)]
            cursors[i] += args.micro_batch
            encoded, num_choices, labels = encode(tokenizer, task, [task["train"][p]
                                                                    for p in picks],
                                                  args.max_length)
            logits = model(i, task, encoded, num_choices)
            n = max(num_choices) if task["choice"] else task["labels"]
            loss = F.cross_entropy(logits, labels) / math.log(max(n, 2))
            (loss / args.accum).backward()
            tokens += int(encoded["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    after = evaluate(model, tokenizer, tasks, args.eval_examples, args.max_length)
    steady = step_times[len(step_times) // 5:]
    steady_tokens = tokens * sum(steady) / max(sum(step_times), 1e-9)
    print(json.dumps({"seconds": time.perf_counter() - began, "steps": args.steps,
                      "tokens_per_s": steady_tokens / max(sum(steady), 1e-9),
                      "accuracy_before": before, "accuracy_after": after}))


if __name__ == "__main__":
    main()
