"""Roofline cost model of one forward+backward step of the triton backend (every figure MODELED).

Per kernel: FLOPs as the tiles execute them (padding rows of a block cost full tiles), HBM bytes
from the tiling and time = max(FLOPs / peak, bytes / bandwidth) on the datasheet numbers.
Assumptions (stated, not measured): routing is uniform, so bucket b gets pairs * n_b / T and each
(transform, token range) segment pads half a block; a transform's weights come from HBM once per
kernel (its later blocks hit L2); re-reads of an activation row across rank tiles hit L2; the
expand's fp32 [tokens, width] accumulator is read and written in HBM once per routed row (the
token ranges do not fit L2 at the goal config); the gate forward is one pass over x and W_gate;
the gate backward's dense GEMM pair runs in fp32 on the CUDA cores (no tf32), its sparse path is
bandwidth-bound gathers. Routing and elementwise glue are left out (tens of microseconds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..layers.config import paper_rank_counts, scaled_max_rank
from ..ops.configs import DENSE_GATE_BACKWARD_RATIO, mixture_layout

# Datasheet peaks: dense bf16 tensor-core FLOP/s, fp32 CUDA-core FLOP/s, HBM bytes/s.
GPUS = {
    "h100": dict(bf16=989e12, fp32=67e12, hbm=3.35e12),
    "h200": dict(bf16=989e12, fp32=67e12, hbm=4.8e12),
    "a100": dict(bf16=312e12, fp32=19.5e12, hbm=2.0e12),
}
# A well-tuned dense bf16 GEMM reaches about this fraction of the peak (~700 TFLOP/s on H100).
DENSE_EFFICIENCY = 0.7


@dataclass
class KernelCost:
    kernel: str
    flops: float
    hbm_bytes: float
    seconds: float
    launches: int = 1


def _cost(name: str, flops: float, nbytes: float, gpu: dict, rate: str = "bf16") -> KernelCost:
    return KernelCost(name, flops, nbytes, max(flops / gpu[rate], nbytes / gpu["hbm"]))


def step_cost(
    d: int, n: int, k: int | None, n_tokens: int, l0: float = 32.0, gpu: str = "h100"
) -> dict:
    """Modeled forward+backward of MOLT(d, paper ranks for n, k) on n_tokens bf16 tokens; with
    k=None the gates are dense [tokens, T] and ``l0`` pairs per token are active."""
    spec = GPUS[gpu]
    rank_counts = paper_rank_counts(n, scaled_max_rank(d))
    ranks, counts = list(rank_counts), list(rank_counts.values())
    n_t = sum(counts)
    slots = n_t if k is None else k
    active = l0 if k is None else k
    pairs = n_tokens * active
    lay = mixture_layout(n_tokens, slots, ranks, counts, d, torch.bfloat16)
    m, g = lay.block_m, lay.n_ranges
    e = 2  # bf16
    rows = [pairs * c / n_t + c * g * m / 2 for c in counts]  # routed rows with padding
    useful = sum(2 * pairs * c / n_t * r * d for r, c in zip(ranks, counts))  # one GEMM pass

    def weights(width: int) -> float:
        return sum(c * r * width * e for r, c in zip(ranks, counts))

    def grouped(width: int) -> float:
        return sum(2 * rw * r * width for rw, r in zip(rows, ranks))

    h_bytes = sum(rw * r * e for rw, r in zip(rows, ranks))
    all_rows = sum(rows)
    acc_rmw = all_rows * d * 4 * 2 + n_tokens * d * (4 + 4 + e)
    kernels = [
        _cost(
            "gate forward",
            2 * n_tokens * n_t * d,
            n_tokens * d * e + n_t * d * 4 + n_tokens * slots * 12,
            spec,
        ),
        _cost("shrink forward", grouped(d), all_rows * d * e + weights(d) + h_bytes, spec),
        _cost("expand forward (combine)", grouped(d), h_bytes + weights(d) + acc_rmw, spec),
        _cost(
            "shrink backward",
            grouped(d),
            all_rows * d * e + weights(d) + 2 * h_bytes + pairs * 8,
            spec,
        ),
        _cost("expand backward dx", grouped(d), h_bytes + weights(d) + acc_rmw, spec),
        _cost("X^T Y dU", grouped(d), all_rows * d * e + h_bytes + weights(d), spec),
        _cost("X^T Y dV", grouped(d), all_rows * d * e + h_bytes + weights(d), spec),
    ]
    if k is None or n_t <= DENSE_GATE_BACKWARD_RATIO * k:
        kernels.append(
            _cost(
                "gate backward (dense GEMM pair, fp32)",
                4 * n_tokens * n_t * d,
                n_tokens * n_t * 4 * 3 + n_tokens * d * (e + 4) + n_t * d * 8,
                spec,
                rate="fp32",
            )
        )
    else:
        kernels.append(
            _cost(
                "gate backward (sparse gathers)",
                4 * pairs * d,
                pairs * d * e * 3 + n_t * d * 8,
                spec,
            )
        )
        kernels[-1].launches = 4
    total = sum(c.seconds for c in kernels)
    useful_step = 6 * useful + 6 * n_tokens * n_t * d  # decode 3 GEMM pairs + gate fwd/bwd
    dense_matmul = useful_step / (spec["bf16"] * DENSE_EFFICIENCY)
    dense_reference = (
        6 * 2 * n_tokens * sum(c * r for r, c in zip(ranks, counts)) * d + 6 * n_tokens * n_t * d
    ) / (spec["bf16"] * DENSE_EFFICIENCY)
    return dict(
        config=dict(
            d=d, N=n, k=k, l0=active, tokens=n_tokens, T=n_t, gpu=gpu, block_m=m, token_ranges=g
        ),
        kernels=[asdict(c) for c in kernels],
        modeled_step_seconds=total,
        modeled_dense_matmul_seconds=dense_matmul,
        modeled_dense_reference_seconds=dense_reference,
        modeled_fraction_of_dense_rate=dense_matmul / total if total else math.nan,
        launches=sum(c.launches for c in kernels),
    )


def render_cost(cost: dict) -> str:
    c = cost["config"]
    lines = [
        f"MODELED fwd+bwd, {c['gpu']}, bf16, d={c['d']} N={c['N']} T={c['T']} k={c['k']} "
        f"(active pairs/token {c['l0']}), {c['tokens']} tokens, BLOCK_M={c['block_m']}, "
        f"{c['token_ranges']} token ranges",
        f"{'kernel (modeled)':<40} {'GFLOP':>9} {'HBM GB':>8} {'time ms':>8}",
    ]
    for k in cost["kernels"]:
        lines.append(
            f"{k['kernel']:<40} {k['flops'] / 1e9:>9.1f} {k['hbm_bytes'] / 1e9:>8.2f} "
            f"{k['seconds'] * 1e3:>8.3f}"
        )
    lines.append(
        f"modeled step {cost['modeled_step_seconds'] * 1e3:.3f} ms over "
        f"{cost['launches']} launches; a dense bf16 matmul of the same useful FLOPs at "
        f"{DENSE_EFFICIENCY:.0%} of peak: {cost['modeled_dense_matmul_seconds'] * 1e3:.3f}"
        f" ms (modeled {cost['modeled_fraction_of_dense_rate']:.0%} of the dense rate); "
        f"dense reference (every transform): "
        f"{cost['modeled_dense_reference_seconds'] * 1e3:.3f} ms"
    )
    return "\n".join(lines)
