"""Roofline cost model of one forward+backward step of the triton backend (every figure MODELED).

Per kernel: FLOPs as the tiles execute them (padding rows of a block cost full tiles, counted on
the block table that ``launch.route`` builds for a uniform or Zipf routing), HBM and L2 bytes
from ``schedule_sim`` (the kernels' programs in launch order on SMs x 2 slots, their accesses at
tile granularity, an LRU L2; its docstring states the assumptions), and

    time = imbalance x max(FLOPs / (bf16 peak x DENSE_EFFICIENCY), HBM bytes / HBM bandwidth,
                           L2 bytes / L2 bandwidth)

with the schedule's imbalance (a partial last wave, a long program's tail). HBM bytes are given
at two L2 sizes: ``L2_EFFECTIVE`` of the datasheet size (the time uses this, conservative) and the
full size. The gate forward is one pass over x and W_gate; the gate backward's dense GEMM pair
runs on the tensor cores (bf16 operands, fp32 out), its sparse path is bandwidth-bound gathers.
Routing and elementwise glue are left out (tens of microseconds). L2 bandwidths are not on the
datasheets: the figures below are sustained-read estimates (A100: 5120 B/clk at 1.41 GHz =
7.2 TB/s peak; H100 SXM: published microbenchmarks of 5.5-7 TB/s on the 114-SM PCIe part), so an
L2-bound time is as uncertain as they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..layers.config import paper_rank_counts, scaled_max_rank
from ..ops.configs import DENSE_GATE_BACKWARD_RATIO, PROGRAMS_PER_SM, mixture_config
from . import schedule_sim as sim

# Datasheet peaks: dense bf16 tensor-core FLOP/s, fp32 CUDA-core FLOP/s, HBM bytes/s, SMs and L2
# bytes; l2_bw: assumed sustained L2 bandwidth (see the module docstring).
GPUS = {
    "h100": dict(bf16=989e12, fp32=67e12, hbm=3.35e12, l2_bw=7.0e12, sms=132, l2=50e6),
    "h200": dict(bf16=989e12, fp32=67e12, hbm=4.8e12, l2_bw=7.0e12, sms=132, l2=50e6),
    "a100": dict(bf16=312e12, fp32=19.5e12, hbm=2.0e12, l2_bw=5.0e12, sms=108, l2=40e6),
}
# A well-tuned dense bf16 GEMM reaches about this fraction of the peak (~700 TFLOP/s on H100);
# the grouped kernels are given the same fraction.
DENSE_EFFICIENCY = 0.7


@dataclass
class KernelCost:
    kernel: str
    flops: float
    hbm_bytes: float
    seconds: float
    launches: int = 1
    l2_bytes: float = 0.0
    hbm_bytes_full_l2: float = 0.0
    imbalance: float = 1.0


def _cost(name: str, flops: float, nbytes: float, gpu: dict, rate: str = "bf16") -> KernelCost:
    eff = DENSE_EFFICIENCY if rate == "bf16" else 1.0
    return KernelCost(name, flops, nbytes, max(flops / (gpu[rate] * eff), nbytes / gpu["hbm"]),
                      hbm_bytes_full_l2=nbytes)


def _simulated(name: str, flops: float, traffic: sim.Traffic, gpu: dict) -> KernelCost:
    low, full = traffic.hbm_bytes
    seconds = traffic.imbalance * max(flops / (gpu["bf16"] * DENSE_EFFICIENCY),
                                      low / gpu["hbm"], traffic.l2_bytes / gpu["l2_bw"])
    return KernelCost(name, flops, low, seconds, l2_bytes=traffic.l2_bytes,
                      hbm_bytes_full_l2=full, imbalance=traffic.imbalance)


def _routing(n_tokens: int, n_t: int, k: int | None, l0: float, routing: str, seed: int):
    """(indices, gates) of a uniform or Zipf routing: k distinct transforms per token, or with
    k=None dense [tokens, T] gates with about l0 nonzero per token."""
    gen = torch.Generator().manual_seed(seed)
    score = torch.zeros(n_tokens, n_t)
    if routing == "zipf":
        score -= 1.2 * torch.log1p(torch.randperm(n_t, generator=gen).float())
    elif routing != "uniform":
        raise ValueError(f"routing must be 'uniform' or 'zipf', got {routing!r}")
    gumbel = -torch.log(-torch.log(torch.rand(n_tokens, n_t, generator=gen)))
    if k is not None:
        return (score + gumbel).topk(k, dim=1).indices, torch.ones(n_tokens, k)
    active = (score + gumbel).topk(max(1, round(l0)), dim=1).indices
    gates = torch.zeros(n_tokens, n_t).scatter_(1, active, 1.0)
    return torch.arange(n_t).expand(n_tokens, n_t), gates


def step_cost(
    d: int, n: int, k: int | None, n_tokens: int, l0: float = 32.0, gpu: str = "h100",
    combine: str = "fixed", routing: str = "uniform", seed: int = 0,
) -> dict:
    """Modeled forward+backward of MOLT(d, paper ranks for n, k) on n_tokens bf16 tokens; with
    k=None the gates are dense [tokens, T] and ``l0`` pairs per token are active. ``combine``:
    one of ``configs.COMBINES`` (the default's, "fixed", for bf16)."""
    spec = GPUS[gpu]
    rank_counts = paper_rank_counts(n, scaled_max_rank(d))
    ranks, counts = list(rank_counts), list(rank_counts.values())
    n_t = sum(counts)
    indices, gates = _routing(n_tokens, n_t, k, l0, routing, seed)
    slots = indices.shape[1]
    cfg = mixture_config(n_tokens, slots, ranks, counts, d, d, torch.bfloat16,
                         combine=combine, sms=spec["sms"])
    lay = cfg.layout
    rank_of_t = torch.repeat_interleave(torch.tensor(ranks), torch.tensor(counts))
    r = sim.build_routing(indices, gates, rank_of_t, cfg, windowed=True)
    pairs = float((gates != 0).sum())
    e = 2  # bf16
    grouped = float(2 * lay.block_m * r.rank.sum() * d)  # one pass, padding rows included
    useful = float(2 * rank_of_t[indices][gates != 0].sum() * d)
    cap = (sim.L2_EFFECTIVE * spec["l2"], spec["l2"])
    slots_gpu = PROGRAMS_PER_SM * spec["sms"]
    # The fixed and atomic combines make the same accesses (4-byte atomics, the fill before and
    # the cast after); the fixed one also reads the expanding weights once for their norms.
    atomic = combine != "ranges"
    weight_bytes = sum(c * r for r, c in zip(ranks, counts)) * d * e
    kernels = [
        _cost("gate forward", 2 * n_tokens * n_t * d,
              n_tokens * d * e + n_t * d * 4 + n_tokens * slots * 12, spec),
        _simulated("shrink forward", grouped, sim.shrink_traffic(
            r, d, cfg.shrink_fwd.tiles, e, False, slots_gpu, cap), spec),
        _simulated("expand forward (combine)", grouped, sim.expand_traffic(
            r, d, cfg.expand_fwd.tiles, e, atomic, slots_gpu, cap), spec),
        _simulated("shrink backward", grouped, sim.shrink_traffic(
            r, d, cfg.shrink_bwd.tiles, e, True, slots_gpu, cap), spec),
        _simulated("expand backward dx", grouped, sim.expand_traffic(
            r, d, cfg.expand_bwd.tiles, e, atomic, slots_gpu, cap), spec),
        _simulated("X^T Y dU", grouped, sim.xty_traffic(
            r, d, cfg.grad_u.tiles, e, slots_gpu, cap), spec),
        _simulated("X^T Y dV", grouped, sim.xty_traffic(
            r, d, cfg.grad_v.tiles, e, slots_gpu, cap), spec),
    ]
    if combine == "fixed":
        # Its zero fill and cast out are in the combine rows' bytes; the row exponents pass reads
        # and writes [2, tokens] int32 (left out).
        norms = _cost("fixed combine: weight norms (U, V)", 2 * 2 * weight_bytes / e,
                      2 * weight_bytes, spec, rate="fp32")
        norms.launches = 4  # per direction: the norms and the cast out
        kernels.append(norms)
    active = pairs / n_tokens
    if k is None or n_t <= DENSE_GATE_BACKWARD_RATIO * k:
        # bf16 operands on the tensor cores, fp32 out (gate_topk.launch._backward_scattered):
        # dx and dW plus their NaN-containment twins (|dpre| @ non-finite mask), four GEMMs;
        # dpre scattered to [N, T] fp32, cast to bf16, its magnitude.
        kernels.append(_cost(
            "gate backward (dense GEMM pair, tensor cores)", 4 * 2 * n_tokens * n_t * d,
            n_tokens * n_t * (4 + 3 * e) * 2 + n_tokens * d * (e + 4) + n_t * d * 8, spec))
    else:
        kernels.append(_cost("gate backward (sparse gathers)", 4 * pairs * d,
                             pairs * d * e * 3 + n_t * d * 8, spec))
        kernels[-1].launches = 4
    total = sum(c.seconds for c in kernels)
    useful_step = 6 * useful + 6 * n_tokens * n_t * d  # decode 3 GEMM pairs + gate fwd/bwd
    dense_matmul = useful_step / (spec["bf16"] * DENSE_EFFICIENCY)
    dense_reference = (
        6 * 2 * n_tokens * sum(c * r for r, c in zip(ranks, counts)) * d + 6 * n_tokens * n_t * d
    ) / (spec["bf16"] * DENSE_EFFICIENCY)
    return dict(
        config=dict(
            d=d, N=n, k=k, l0=active, tokens=n_tokens, T=n_t, gpu=gpu, block_m=lay.block_m,
            token_ranges=lay.n_ranges, window_ranges=lay.window_ranges,
            combine={"fixed": "fixed-point (deterministic)",
                     "ranges": "range-owned (deterministic)",
                     "atomic": "fp32 atomic (opt-in, nondeterministic)"}[combine],
            routing=routing,
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
        f"(active pairs/token {c['l0']:.1f}, {c['routing']} routing), {c['tokens']} tokens, "
        f"BLOCK_M={c['block_m']}, {c['token_ranges']} token ranges in L2 windows of "
        f"{c['window_ranges']}, {c['combine']} combine",
        f"HBM GB at {sim.L2_EFFECTIVE:.0%} of the L2 (the time uses it) / at all of it; "
        f"imbalance: makespan over ideal",
        f"{'kernel (modeled)':<40} {'GFLOP':>7} {'L2 GB':>7} {'HBM GB':>13} {'imbal':>6} "
        f"{'time ms':>8}",
    ]
    for k in cost["kernels"]:
        hbm = f"{k['hbm_bytes'] / 1e9:.2f} / {k['hbm_bytes_full_l2'] / 1e9:.2f}"
        lines.append(
            f"{k['kernel']:<40} {k['flops'] / 1e9:>7.1f} {k['l2_bytes'] / 1e9:>7.2f} {hbm:>13} "
            f"{k['imbalance']:>6.2f} {k['seconds'] * 1e3:>8.3f}"
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
