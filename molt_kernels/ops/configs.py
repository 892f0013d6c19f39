"""Launch configurations of every Triton kernel: tile sizes, warps and pipeline depth, in one place.

The launch code (``ops/<op>/launch.py``) asks here for its configs; the gpu-report builds
(``ops/<op>/builds.py``) enumerate the same functions, so every config the launchers can pick is
compiled for sm_80 and sm_90 in CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .dtypes import HALF, accumulator_dtype


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1); no Triton import needed to plan launches."""
    return 1 << max(0, n - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# gate_topk: the fused gate and its backward

# Largest running list kept in registers; larger k takes the dense fallback.
MAX_K_PAD = 256
# The smallest list the selection kernels keep: smaller k would only add compile variants.
MIN_K_PAD = 8


@dataclass(frozen=True)
class FwdConfig:
    """Tiles of the selection kernels: BLOCK_N tokens x BLOCK_T transforms, K_PAD kept keys."""

    block_n: int
    block_t: int
    block_d: int
    k_pad: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return (f"K_PAD={self.k_pad},BN={self.block_n},BT={self.block_t},BD={self.block_d},"
                f"w{self.num_warps}s{self.num_stages}")


@dataclass(frozen=True)
class TileConfig:
    """Tiles of the dense forward (k=None, or k > MAX_K_PAD)."""

    block_n: int
    block_t: int
    block_d: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return (f"BN={self.block_n},BT={self.block_t},BD={self.block_d},"
                f"w{self.num_warps}s{self.num_stages}")


# The k-loop of a tile reads BLOCK_D x 2 bytes per row for 16-bit inputs, 4 for fp32, 8 for fp64;
# the same 128 bytes per row per stage keeps loads vectorised and shared memory flat.
_BLOCK_D_BYTES = 128


def _block_d(x_dtype: torch.dtype) -> int:
    return max(16, _BLOCK_D_BYTES // (torch.finfo(x_dtype).bits // 8))


def k_pad_for(k: int) -> int:
    """Length of the running list: the power of 2 at or above k (at least MIN_K_PAD)."""
    return max(MIN_K_PAD, next_power_of_2(k))


def fwd_config(k: int, x_dtype: torch.dtype) -> FwdConfig | None:
    """Selection-kernel tiles for k and x's dtype; None when the dense fallback selects instead:
    k beyond the register budget, or fp64 (a packed int64 key cannot hold a double and an id, and
    ranking fp64 values rounded to fp32 breaks near-ties and values outside fp32's range)."""
    k_pad = k_pad_for(k)
    if k_pad > MAX_K_PAD or x_dtype == torch.float64:
        return None
    # The tile must hold K_PAD candidates. Its int64 keys, their top K_PAD and the running list
    # share the registers with the accumulator, so longer lists take fewer tokens per program;
    # fp32 (ieee, no tensor cores) dots hold more per thread, so they take 16 tokens.
    # Every choice here compiles without spills on sm_80 and sm_90 (see gpu_report_builds).
    if x_dtype in HALF:
        block_n = 64 if k_pad <= 64 else (32 if k_pad == 128 else 16)
        block_t, num_warps = max(k_pad, 128), 8
    else:
        block_n = 16
        block_t = max(k_pad, 128)
        num_warps = 8 if block_t > 128 else 4
    # fp32 ("ieee") dots run on the FMA units, so a deeper load pipeline buys little,
    # and its registers make ptxas spill.
    num_stages = 3 if x_dtype in HALF else 2
    return FwdConfig(block_n=block_n, block_t=block_t, block_d=_block_d(x_dtype), k_pad=k_pad,
                     num_warps=num_warps, num_stages=num_stages)


# The split-T merge holds two [MERGE_BLOCK_N, K_PAD] int64 lists and no accumulator.
MERGE_BLOCK_N = 16
MERGE_NUM_WARPS = 4


def dense_config(x_dtype: torch.dtype) -> TileConfig:
    """Dense-forward tiles for x's dtype."""
    size = 32 if x_dtype == torch.float64 else 64
    return TileConfig(block_n=size, block_t=size, block_d=_block_d(x_dtype), num_warps=4,
                      num_stages=3)


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of the backward kernels (all memory-bound gathers)."""

    pair_block_p: int = 32  # gathered x and W tiles carry a 64-bit address per element
    pair_block_d: int = 64
    dx_block_n: int = 32
    dx_block_d: int = 128
    dw_block_m: int = 16  # routed rows per block: MOLT gates spread pairs thinly over T
    dw_block_d: int = 128
    dw_group: int = 16  # blocks per dW program; more go to the chunk reduction
    num_warps: int = 4


BWD = BwdConfig()


def split_count(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Programs per token block along T: enough to give every SM two programs."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one; splitting only adds the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, (2 * sms) // n_blocks))


# ----------------------------------------------------------------------------------------------
# lowrank_mixture: grouped shrink / expand / X^T Y by rank bucket

# tl.dot needs every dimension >= 16.
MIN_TILE = 16
# Largest output tile side and K step: tensor-core dtypes take 128-wide tiles (wgmma works per
# 64-row warpgroup); fp32 (ieee, FMA) and fp64 stop at 64, with K steps of 16 because their dot
# holds both operands' K slices in registers.
WIDE_TILE = {"half": 128, "full": 64}
DEEP_TILE = {"half": 64, "full": 16}
# A block holds about half the expected rows of a transform, so padding stays under ~1/4 of the
# rows; ranks under 128 are bandwidth-bound at any BLOCK_M, so they stop at 64 rows.
MAX_BLOCK_M_LOW_RANK, MAX_BLOCK_M, LOW_RANK = 64, 128, 128
# Warps and pipeline depth. Tensor-core tiles get 8 warps once their fp32 accumulator reaches
# 64 KiB (64 registers per thread). The FMA (fp32 ieee) and DMMA (fp64) paths also hold their
# operands' K slices in registers: they always get 8 warps and 2 stages, the one choice of
# {4, 8} warps x {2, 3} stages that left every config spill-free on sm_80 and sm_90.
WARPS, BIG_WARPS, BIG_ACCUMULATOR_BYTES = 4, 8, 64 << 10
MAX_STAGES = {"half": 3, "full": 2}
# Pipeline stages fit in this much shared memory (sm_80 allows 163 KiB per block).
STAGE_BYTES = 128 << 10
# Hot transforms: their rows split into chunks of >= MIN_CHUNK_ROWS, with at most this many
# partial sums per bucket (and their accumulator-dtype buffer under PARTIAL_BYTES), allotted by
# pair count.
MIN_CHUNK_ROWS, MAX_SPLITS, PARTIAL_BYTES = 256, 64, 64 << 20
# Elementwise kernels (slot sums, partial sums): tile sizes; WARPS warps, no pipelining.
SLOT_SUM_TOKENS, SLOT_SUM_WIDTH, PARTIAL_SUM_BLOCK = 8, 256, 1024



@dataclass(frozen=True)
class Launch:
    """Constexpr tile sizes plus warps and pipeline stages of one kernel launch."""

    tiles: dict[str, int]
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BucketConfig:
    """Launch configs of one rank bucket. Widths: shrink K, expand N, X^T Y output P."""

    block_m: int
    shrink_fwd: Launch  # K = d_in
    expand_fwd: Launch  # N = d_out
    shrink_bwd: Launch  # K = d_out
    expand_bwd: Launch  # N = d_in
    grad_u: Launch  # P = d_out
    grad_v: Launch  # P = d_in
    splits_u: int  # partial-sum slots for hot transforms of dU, dV
    splits_v: int


def _pow2_tile(size: int, cap: int) -> int:
    return min(cap, max(MIN_TILE, next_power_of_2(size)))


def _launch(
    kind: str, acc_shape: tuple[int, int], acc_bytes: int, stage_bytes: int, **tiles: int
) -> Launch:
    big = kind == "full" or acc_shape[0] * acc_shape[1] * acc_bytes >= BIG_ACCUMULATOR_BYTES
    warps = BIG_WARPS if big else WARPS
    return Launch(tiles, warps, max(1, min(MAX_STAGES[kind], STAGE_BYTES // stage_bytes)))


def bucket_config(
    rank: int, d_in: int, d_out: int, dtype: torch.dtype, rows_per_transform: float
) -> BucketConfig:
    """Every launch parameter of one bucket, from its rank, the widths, the input dtype and the
    expected pairs per transform."""
    kind = "half" if dtype in HALF else "full"
    wide, deep = WIDE_TILE[kind], DEEP_TILE[kind]
    elem = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=accumulator_dtype(dtype)).element_size()
    m_cap = MAX_BLOCK_M if rank >= LOW_RANK else MAX_BLOCK_M_LOW_RANK
    m = 1 << max(0, int(math.floor(math.log2(max(rows_per_transform / 2, 1.0)))))
    m = min(m_cap, max(MIN_TILE, m))
    tile_r = _pow2_tile(rank, wide)
    step_r = _pow2_tile(rank, deep)

    def shrink(k: int) -> Launch:
        bk = _pow2_tile(k, deep)
        return _launch(kind, (m, tile_r), acc, (m * bk + bk * tile_r) * elem,
                       BLOCK_M=m, BLOCK_R=tile_r, BLOCK_K=bk)

    def expand(n: int) -> Launch:
        bn = _pow2_tile(n, wide)
        return _launch(kind, (m, bn), acc, (m * step_r + step_r * bn) * elem,
                       BLOCK_M=m, BLOCK_N=bn, BLOCK_K=step_r)

    def xty(p: int) -> Launch:
        bp, step = _pow2_tile(p, wide), min(m, deep)
        return _launch(kind, (bp, tile_r), acc, (bp * step + step * tile_r) * elem,
                       BLOCK_M=m, BLOCK_P=bp, BLOCK_Q=tile_r, BLOCK_K=step)

    def splits(p: int) -> int:
        return min(MAX_SPLITS, PARTIAL_BYTES // (p * rank * acc))

    return BucketConfig(
        block_m=m,
        shrink_fwd=shrink(d_in),
        expand_fwd=expand(d_out),
        shrink_bwd=shrink(d_out),
        expand_bwd=expand(d_in),
        grad_u=xty(d_out),
        grad_v=xty(d_in),
        splits_u=splits(d_out),
        splits_v=splits(d_in),
    )


def plan(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: torch.dtype
) -> list[BucketConfig]:
    """BucketConfig per bucket, from shapes only (so the fake kernel and backward agree)."""
    n_transforms = sum(v.shape[0] for v in V)
    # Uniform routing spreads n_tokens * min(k, T) pairs evenly over the transforms.
    rows = n_tokens * min(n_slots, n_transforms) / max(n_transforms, 1)
    d_in, d_out = V[0].shape[2], U[0].shape[1]
    return [bucket_config(v.shape[1], d_in, d_out, dtype, rows) for v in V]
