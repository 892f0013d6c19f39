"""Useful FLOPs, block-padding waste and bytes moved of the triton MOLT decode, computed.

    python bench/lowrank_padding_report.py [--tokens 16384] [--d 2304] [--n 16] [--k 32]
                                           [--dtype bf16] [--zipf 1.0] [--seed 0]

Routes random inputs exactly as the triton backend does (its BLOCK_M per bucket, ``route_pairs``,
its split of hot transforms) for three routings: a randomly initialised MOLT (the paper
allocation N x 512 ... 16N x 32) gating x ~ N(0, 1); Zipf, where the t-th most popular transform
(random order) is drawn with weight t^-s, k distinct per token; and uniform random indices.

Per bucket it counts, for the six matmul kernels (shrink, expand; backward shrink, expand, and
the grouped X^T Y of dU and dV), the multiply-adds the launched tiles execute (padding rows of a
block, rank and width tiles rounded up) against the useful ones (pairs x r x width), and the bytes
the kernels request from global memory: every tile each program loads or stores, masked rows
excluded, no cache reuse assumed (an upper bound on DRAM traffic; weights are re-read per block).
Useful FLOPs count 2 per multiply-add of the active pairs' matmuls only: 2 forward (shrink,
expand), 4 backward (dH, dx, dU, dV), so backward = 2 x forward; the gate op is not counted.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from molt_kernels import MOLT, MOLTConfig
from molt_kernels.layers.flops import FLOPS_PER_MAC
from molt_kernels.ops import configs
from molt_kernels.ops.lowrank_mixture import launch as triton_impl
from molt_kernels.ops.routing import Routing, route_pairs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX_BYTES = 8  # int64 pair ids, transform ids, chunk rows
GATE_BYTES = 4  # fp32 gates and dgates
KERNELS = ("shrink", "expand", "shrink_bwd", "expand_bwd", "xty_dU", "xty_dV")


@dataclass
class Bucket:
    """What one bucket's kernels see: shape, config and the routed counts."""

    rank: int
    n: int
    cfg: configs.BucketConfig
    counts: Tensor  # [n] pairs per transform
    blocks: int  # blocks holding pairs

    @property
    def pairs(self) -> int:
        return int(self.counts.sum())


def tiles(size: int, tile: int) -> int:
    return math.ceil(size / tile)


def padded(size: int, tile: int) -> int:
    return tiles(size, tile) * tile


def routing_of(name: str, cfg: MOLTConfig, n_tokens: int, zipf: float) -> Tensor:
    """indices [n_tokens, k] int64 of one routing (see the module docstring)."""
    t = cfg.n_transforms
    if name == "molt-init":
        layer = MOLT(cfg, backend="torch")
        with torch.no_grad():
            gates, indices = layer.encode(torch.randn(n_tokens, cfg.d_in))
        # Pairs with a zero gate are dropped by the routing; mark them with an out-of-range id.
        return torch.where(gates != 0, indices, -1)
    if name == "zipf":
        weight = torch.arange(1, t + 1, dtype=torch.float64).pow(-zipf)[torch.randperm(t)]
        score = weight.log().expand(n_tokens, t)
    else:
        score = torch.zeros(n_tokens, t, dtype=torch.float64)
    # Gumbel top-k: k distinct transforms per token with probability proportional to exp(score).
    gumbel = -torch.log(-torch.log(torch.rand(n_tokens, t, dtype=torch.float64)))
    return (score + gumbel).topk(cfg.k, dim=1).indices


def buckets_of(cfg: MOLTConfig, indices: Tensor, dtype: torch.dtype) -> list[Bucket]:
    n_tokens, k = indices.shape
    U = [torch.empty(n, cfg.d_out, r, device="meta") for r, n in cfg.rank_counts.items()]
    V = [torch.empty(n, r, cfg.d_in, device="meta") for r, n in cfg.rank_counts.items()]
    plans = configs.plan(n_tokens, k, U, V, dtype)
    keep = indices >= 0
    routing: Routing = route_pairs(indices.clamp_min(0), keep, cfg.counts,
                                   tuple(c.block_m for c in plans))
    buckets, t0 = [], 0
    for (rank, n), c, used in zip(cfg.rank_counts.items(), plans, routing.blocks_used):
        buckets.append(Bucket(rank, n, c, routing.pair_counts[t0 : t0 + n], int(used)))
        t0 += n
    return buckets


def macs(b: Bucket, d_in: int, d_out: int) -> dict[str, tuple[int, int]]:
    """(launched, useful) multiply-adds per kernel of one bucket."""
    c, r, rows = b.cfg, b.rank, b.blocks * b.cfg.block_m

    def shrink(launch: configs.Launch, k: int) -> int:
        t = launch.tiles
        return rows * padded(r, t["BLOCK_R"]) * padded(k, t["BLOCK_K"])

    def expand(launch: configs.Launch, n: int) -> int:
        t = launch.tiles
        return rows * padded(n, t["BLOCK_N"]) * padded(r, t["BLOCK_K"])

    def xty(launch: configs.Launch, p: int) -> int:
        t = launch.tiles
        return rows * padded(p, t["BLOCK_P"]) * padded(r, t["BLOCK_Q"])

    useful_in, useful_out = b.pairs * r * d_in, b.pairs * r * d_out
    return {
        "shrink": (shrink(c.shrink_fwd, d_in), useful_in),
        "expand": (expand(c.expand_fwd, d_out), useful_out),
        "shrink_bwd": (shrink(c.shrink_bwd, d_out), useful_out),
        "expand_bwd": (expand(c.expand_bwd, d_in), useful_in),
        "xty_dU": (xty(c.grad_u, d_out), useful_out),
        "xty_dV": (xty(c.grad_v, d_in), useful_in),
    }


def bytes_moved(b: Bucket, d_in: int, d_out: int, elem: int, acc: int) -> dict[str, float]:
    """Bytes each of the bucket's kernels loads and stores (tile-level, masked rows excluded)."""
    c, r, pairs = b.cfg, b.rank, b.pairs
    m = c.block_m
    rows = b.blocks * m
    ids = rows * INDEX_BYTES + b.blocks * INDEX_BYTES  # pair of each row, transform of each block

    def shrink(launch: configs.Launch, k: int, backward: bool) -> float:
        n_r = tiles(r, launch.tiles["BLOCK_R"])
        moved = n_r * (ids + pairs * k * elem)  # gathered rows, once per rank tile
        moved += b.blocks * r * k * elem  # the transform's weights, once per block
        moved += rows * r * elem  # h_pre stored (forward) or g dH stored (backward)
        if backward:
            moved += rows * r * elem + n_r * pairs * 2 * GATE_BYTES  # h_pre; gate, dgate share
        return moved

    def expand(launch: configs.Launch, n: int, gated: bool) -> float:
        n_n = tiles(n, launch.tiles["BLOCK_N"])
        moved = n_n * (ids + rows * r * elem + (pairs * GATE_BYTES if gated else 0))
        return moved + b.blocks * r * n * elem + pairs * n * elem  # weights; slot rows stored

    def xty(launch: configs.Launch, p: int, gated: bool, splits: int) -> float:
        n_p, n_q = tiles(p, launch.tiles["BLOCK_P"]), tiles(r, launch.tiles["BLOCK_Q"])
        moved = n_p * n_q * (ids + (pairs * GATE_BYTES if gated else 0))
        moved += (n_q * p + n_p * r) * pairs * elem  # X column tiles per Q tile, H per P tile
        return moved + b.n * p * r * elem + partials(b, splits, p, acc)

    return {
        "shrink": shrink(c.shrink_fwd, d_in, False),
        "expand": expand(c.expand_fwd, d_out, True),
        "shrink_bwd": shrink(c.shrink_bwd, d_out, True),
        "expand_bwd": expand(c.expand_bwd, d_in, False),
        "xty_dU": xty(c.grad_u, d_out, True, c.splits_u),
        "xty_dV": xty(c.grad_v, d_in, False, c.splits_v),
    }


def partials(b: Bucket, splits: int, p: int, acc: int) -> float:
    """Bytes of the hot transforms' partial sums: each written once and read back once."""
    _, split = triton_impl.split_chunks(b.counts, b.cfg.block_m, splits)
    n_partials = int(split[:, 2][split[:, 0] >= 0].sum())
    return 2 * n_partials * p * b.rank * acc


def report(name: str, cfg: MOLTConfig, indices: Tensor, dtype: torch.dtype) -> None:
    n_tokens, k = indices.shape
    d_in, d_out = cfg.d_in, cfg.d_out
    elem = torch.empty((), dtype=dtype).element_size()
    acc = GATE_BYTES
    buckets = buckets_of(cfg, indices, dtype)
    pairs = sum(b.pairs for b in buckets)
    useful_fwd = sum(FLOPS_PER_MAC * b.pairs * b.rank * (d_in + d_out) for b in buckets)
    print(f"\n== routing: {name}  ({pairs} kept pairs of {n_tokens * k}; "
          f"mean active rank {sum(b.pairs * b.rank for b in buckets) / n_tokens:.0f}/token)")
    print(f"useful FLOPs: forward {useful_fwd / 1e12:.3f} TFLOP, backward "
          f"{2 * useful_fwd / 1e12:.3f} TFLOP, total {3 * useful_fwd / 1e12:.3f} TFLOP")
    print(f"{'rank':>5} {'n_b':>4} {'BLOCK_M':>7} {'pairs':>8} {'pairs/t min/mean/max':>21} "
          f"{'blocks':>7} {'launched/useful MACs':>21} {'waste':>6}")
    totals = defaultdict(lambda: [0, 0])
    moved: dict[str, float] = defaultdict(float)
    for b in buckets:
        per_kernel = macs(b, d_in, d_out)
        launched = sum(v[0] for v in per_kernel.values())
        useful = sum(v[1] for v in per_kernel.values())
        for kname, (lm, um) in per_kernel.items():
            totals[kname][0] += lm
            totals[kname][1] += um
        for kname, nbytes in bytes_moved(b, d_in, d_out, elem, acc).items():
            moved[kname] += nbytes
        waste = 1 - useful / launched if launched else 0.0
        spread = f"{int(b.counts.min())}/{b.pairs / b.n:.0f}/{int(b.counts.max())}"
        print(f"{b.rank:>5} {b.n:>4} {b.cfg.block_m:>7} {b.pairs:>8} {spread:>21} "
              f"{b.blocks:>7} {launched / 1e9:>9.1f}G/{useful / 1e9:.1f}G {waste:>6.1%}")
    launched = sum(v[0] for v in totals.values())
    useful = sum(v[1] for v in totals.values())
    print(f"{'all':>5} {'':>4} {'':>7} {pairs:>8} {'':>21} {'':>7} "
          f"{launched / 1e9:>9.1f}G/{useful / 1e9:.1f}G {1 - useful / launched:>6.1%}")

    # Layer-level tensors outside the per-bucket kernels.
    slots_y = pairs * d_out * elem  # read back by the forward's slot sum
    slots_dx = pairs * d_in * elem
    dgate_tiles = max(tiles(b.rank, b.cfg.shrink_bwd.tiles["BLOCK_R"]) for b in buckets)
    moved["slot_sum y"] = slots_y + n_tokens * k * INDEX_BYTES + n_tokens * d_out * elem
    moved["slot_sum dx"] = slots_dx + n_tokens * k * INDEX_BYTES + n_tokens * d_in * elem
    moved["dgate tiles + db_dec"] = (3 * dgate_tiles * n_tokens * k * GATE_BYTES
                                     + n_tokens * d_out * elem)
    forward = ("shrink", "expand", "slot_sum y")
    fwd_bytes = sum(moved[kname] for kname in forward)
    total = sum(moved.values())
    print(f"bytes moved ({str(dtype).removeprefix('torch.')}, tile-level, no cache reuse): "
          f"forward {fwd_bytes / 1e9:.2f} GB, backward {(total - fwd_bytes) / 1e9:.2f} GB, "
          f"forward+backward {total / 1e9:.2f} GB")
    for kname, nbytes in moved.items():
        print(f"  {kname:<22} {nbytes / 1e9:8.2f} GB")
    slot_share = (2 * slots_y + 2 * slots_dx) / total
    print(f"  of which slot buffers (written + read, y and dx): "
          f"{(2 * slots_y + 2 * slots_dx) / 1e9:.2f} GB = {slot_share:.0%}")
    print(f"useful FLOPs / byte (forward+backward): {3 * useful_fwd / total:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--n", type=int, default=16, help="paper allocation N (N x 512 ...)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = MOLTConfig.paper(args.d, args.n, args.k)
    print(f"d_in = d_out = {args.d}, rank_counts {cfg.rank_counts} (T = {cfg.n_transforms}), "
          f"k = {args.k}, {args.tokens} tokens, {args.dtype}")
    for name in ("molt-init", "zipf", "uniform"):
        report(name, cfg, routing_of(name, cfg, args.tokens, args.zipf), DTYPES[args.dtype])


if __name__ == "__main__":
    main()
