"""The scaling model: predicted data-parallel efficiency at 8, 64 and 256 GPUs.

    python bench/scaling.py [--parameters 355e6] [--tokens-per-s 152500] [--tokens-per-step 65536]

From one GPU's measured speed (tokens/s on the real path) and the tokens each GPU trains per
optimizer step, a step computes for C = tokens-per-step / tokens-per-s seconds, whatever the
number of GPUs (each keeps its micro-batches: weak scaling). Communication per step, with
muppet-ray's one reduction per step (train.one_reduction: after the last backward, not overlapped
with it), in bf16 (2 bytes a parameter, S = 2N bytes):
  ZeRO-2: a reduce-scatter of the gradients and an all-gather of the updated weights, together
          the traffic of one all-reduce: 2 S (W-1)/W a GPU;
  ZeRO-3: that, plus an all-gather of the weights before every pass's forward and backward:
          2 S (W-1)/W per pass more (partly hidden by prefetching; counted in full here).
Time of collectives moving V bytes a GPU: within a node V / B_nvlink; across n nodes, done
hierarchically (NCCL: within each node, then each GPU's 1/8 share across the nodes, the 8 shares
side by side), a node sends about V (n-1)/n through its links: V (n-1)/n / B_node. The slower of
the two, plus a latency of 2 (W-1) hops x alpha. Efficiency = C / (C + communication).
Assumptions (edit them with the options): 8 GPUs a node; NVLink bus bandwidth 360 GB/s (what
NCCL's all-reduce reaches on H100/H200 NVLink 4); node-to-node 100, 200 or 400 Gb/s a node in
all; alpha 5 us a hop.
"""

from __future__ import annotations

import argparse

import bench_cli

GPUS_PER_NODE = 8


def communication_s(volume: float, gpus: int, nvlink: float, node_link: float,
                    alpha: float) -> float:
    """Seconds to move `volume` bytes a GPU through a ring of `gpus` (bandwidths in bytes/s)."""
    within = volume / nvlink
    nodes = -(-gpus // GPUS_PER_NODE)
    # each node sends its GPUs' shares out through its links: 8 x volume/8 ... x (n-1)/n
    across = volume * (nodes - 1) / nodes / node_link if nodes > 1 else 0.0
    return max(within, across) + 2 * (gpus - 1) * alpha


def efficiency(parameters: float, compute_s: float, gpus: int, zero: int, passes: int,
               nvlink: float, node_link: float, alpha: float) -> float:
    size = 2 * parameters
    collectives = 1 + (passes if zero == 3 else 0)
    volume = collectives * 2 * size * (gpus - 1) / gpus
    return compute_s / (compute_s + communication_s(volume, gpus, nvlink, node_link, alpha))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parameters", type=float, default=355e6, help="RoBERTa-large")
    parser.add_argument("--tokens-per-s", type=float, default=152_500,
                        help="one H200, real path, large, ZeRO-2 (issue 24's table)")
    parser.add_argument("--tokens-per-step", type=float, default=32 * 4 * 512,
                        help="a GPU's tokens a step (32 x 512 tokens x 4 micro-batches)")
    parser.add_argument("--passes", type=int, default=4, help="passes a GPU a step (ZeRO-3)")
    parser.add_argument("--nvlink-gb-s", type=float, default=360.0)
    parser.add_argument("--alpha-us", type=float, default=5.0)
    args = parser.parse_args()
    bench_cli.positive(parameters=args.parameters, tokens_per_s=args.tokens_per_s,
                       tokens_per_step=args.tokens_per_step, passes=args.passes,
                       nvlink_gb_s=args.nvlink_gb_s)
    compute = args.tokens_per_step / args.tokens_per_s
    print(f"{args.parameters / 1e6:.0f}M parameters, {args.tokens_per_s:,.0f} tokens/s a GPU, "
          f"{args.tokens_per_step:,.0f} tokens a GPU a step: {compute * 1e3:.0f} ms of compute "
          "a step")
    links = [100, 200, 400]
    print(f"{'GPUs':>5} {'ZeRO':>5} " + " ".join(f"{f'{g} Gb/s':>10}" for g in links))
    for gpus in (8, 64, 256):
        for zero in (2, 3):
            cells = [efficiency(args.parameters, compute, gpus, zero, args.passes,
                                args.nvlink_gb_s * 1e9, gbit * 1e9 / 8, args.alpha_us * 1e-6)
                     for gbit in links]
            print(f"{gpus:>5} {zero:>5} " + " ".join(f"{c:>10.1%}" for c in cells))


if __name__ == "__main__":
    main()
