"""Packed against padded micro-batches on this machine: the encoder's forward and backward.

    python bench/packing.py [--threads 2] [--repeats 5]

A MiniLM-sized BERT encoder (6 x 384, built from config), training mode, on micro-batches of
random rows whose lengths spread below the longest by a set amount (how much of a padded
micro-batch is real: the `real` column), once padded (model.attention: padded) and once packed
(packing.encode: the rows end to end, attention kept in each row). Median seconds of forward +
backward over the repeats, after one warm-up. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_cli
import torch
from transformers import BertConfig, BertModel

from muppet_ray import packing

CASES = [  # rows, longest, spread of lengths below it
    (16, 32, 4), (16, 32, 31), (16, 128, 100), (128, 48, 40), (32, 128, 16)]


def timed(model: torch.nn.Module, inputs: dict, packed: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        hidden = (packing.encode(model, inputs) if packed
                  else model(**inputs).last_hidden_state)
        hidden.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_cli.positive(threads=args.threads, repeats=args.repeats)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536)
    padded_model = BertModel(config, add_pooling_layer=False).train()
    packed_model = BertModel(config, add_pooling_layer=False).train()
    packed_model.load_state_dict(padded_model.state_dict())
    packing.use_packed_attention(packed_model)
    print(f"{'rows':>5} {'longest':>8} {'real':>6} {'padded ms':>10} {'packed ms':>10} "
          f"{'speed-up':>9}")
    for rows, longest, spread in CASES:
        lengths = torch.randint(longest - spread, longest + 1, (rows,))
        lengths[0] = longest
        mask = (torch.arange(longest)[None] < lengths[:, None]).long()
        inputs = {"input_ids": torch.randint(5, 30000, (rows, longest)) * mask,
                  "attention_mask": mask}
        padded = timed(padded_model, inputs, False, args.repeats)
        packed = timed(packed_model, inputs, True, args.repeats)
        print(f"{rows:>5} {longest:>8} {mask.float().mean().item():>6.2f} {padded * 1e3:>10.0f} "
              f"{packed * 1e3:>10.0f} {padded / packed:>9.2f}")


if __name__ == "__main__":
    main()
