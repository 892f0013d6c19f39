"""Triton kernels of the MOLT decode: grouped variable-rank low-rank matmuls, one bucket at a time.

Every kernel reads the block layout of ``ops.routing``: a block of BLOCK_M rows belongs to one
transform, so a program loads one transform's weights and a tile of rows gathered by token. One
kernel serves every bucket: the rank R is a compile-time constant and the rank dimension is tiled
and masked, so ranks that are not powers of two (48) run without padding the weights.

Kernels (grid; what a program reads -> writes):

- ``_shrink_kernel`` (bucket blocks, rank tiles): H = A[token(rows)] @ W_t^T, a BLOCK_R slice of
  R, K = A's width in BLOCK_K steps. Forward: A = x, W_t = V_t -> h_pre (ungated) [rows, R].
  Backward: A = dY, W_t = U_t^T -> g dH [rows, R] and the rank tile's share of
  dgate = rowsum(dH * h_pre) [rank tiles, pairs], summed over tiles in order afterwards.
- ``_expand_kernel`` (bucket blocks, width tiles): (g) H[rows] @ W_t -> one row per pair of a
  [pairs, width] slot buffer. Forward: H = h_pre gated here, W_t = U_t^T -> y's slots.
  Backward: H = g dH, W_t = V_t -> dx's slots.
- ``_slot_sum_kernel`` (token tiles, width tiles): out[n] = bias + sum over kept slots s of
  slot[n k + s], s ascending, accumulated in fp32.
- ``_xty_kernel`` (chunks, output tiles): grouped X^T Y, C_t = X[token(rows)]^T (g) H[rows] summed
  over a chunk of t's blocks; dU_t = dY^T (g h_pre), dV_t^T = x^T (g dH). A transform's blocks form
  one chunk, or several for hot transforms, whose partial sums ``_partial_sum_kernel``
  (transforms, tiles) then adds in chunk order.

Everything is deterministic: each output element is written by one program and every sum runs in
a fixed order (no atomics). Launches are sync-free: grids come from shape-only bounds (routing's
block capacity, n_b + split slots) and surplus programs exit on a -1 transform id.

Precision: bf16/fp16 inputs use tensor cores with fp32 accumulation; h_pre, g dH and the slot
buffers stay in the input dtype, gates and sums over slots in fp32. fp32 inputs use
``input_precision="ieee"`` (no tf32). fp64 inputs run natively in fp64 (DMMA on sm_80+), so the
backend can be gradchecked; all other dtypes accumulate in fp32.

Memory: h_pre and g dH are [row capacity of the bucket, R]; the capacity is routing's shape-only
bound (every token could pick min(k, n_b) transforms of one bucket), so it exceeds the rows used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...gpu_report import KernelBuild
from ..routing import Routing, route_pairs

_HALF = (torch.bfloat16, torch.float16)

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


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    a_ptr, w_ptr, h_ptr, dh_ptr, gate_ptr, dgate_ptr, block_t_ptr, row_pair_ptr,
    K, n_slots, t0,
    stride_am, stride_ak, stride_wt, stride_wr, stride_wk, stride_hm, stride_dgate,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BACKWARD: tl.constexpr, ACC: tl.constexpr,
):
    block = tl.program_id(0)
    t = tl.load(block_t_ptr + block)
    if t < 0:
        return
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair >= 0
    tok = tl.where(valid, pair // n_slots, 0)
    a_rows = a_ptr + tok[:, None] * stride_am
    w_t = w_ptr + (t - t0) * stride_wt
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r[None, :] < R
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_rows + kk[None, :] * stride_ak,
                    mask=valid[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_t + offs_r[None, :] * stride_wr + kk[:, None] * stride_wk,
                    mask=r_mask & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    h_tile = rows[:, None] * stride_hm + offs_r[None, :]
    if BACKWARD:
        h_pre = tl.load(h_ptr + h_tile, mask=r_mask, other=0.0).to(ACC)
        # This rank tile's share of dgate; the launch code sums the tiles in order.
        dgate = tl.sum(acc * h_pre, axis=1)
        tl.store(dgate_ptr + tl.program_id(1).to(tl.int64) * stride_dgate + pair,
                 dgate.to(dgate_ptr.dtype.element_ty), mask=valid)
        gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
        tl.store(dh_ptr + h_tile, (acc * gate[:, None]).to(dh_ptr.dtype.element_ty),
                 mask=r_mask)
    else:
        tl.store(h_ptr + h_tile, acc.to(h_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, out_ptr, gate_ptr, block_t_ptr, row_pair_ptr,
    N, t0,
    stride_hm, stride_wt, stride_wr, stride_wn, stride_om,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, ACC: tl.constexpr,
):
    block = tl.program_id(0)
    t = tl.load(block_t_ptr + block)
    if t < 0:
        return
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair >= 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n[None, :] < N
    w_t = w_ptr + (t - t0) * stride_wt
    if GATED:
        gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for r0 in range(0, R, BLOCK_K):
        kk = r0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :], mask=kk[None, :] < R,
                    other=0.0)
        if GATED:
            # The gate multiplies r values per row here, not d_out values after the matmul.
            h = (h.to(ACC) * gate[:, None]).to(h_ptr.dtype.element_ty)
        w = tl.load(w_t + kk[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                    mask=(kk[:, None] < R) & n_mask, other=0.0)
        acc = tl.dot(h, w, acc, input_precision="ieee")
    tl.store(out_ptr + pair[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask)


@triton.jit
def _slot_sum_kernel(
    slot_ptr, pair_row_ptr, bias_ptr, out_ptr,
    n_tokens, n_slots, D,
    stride_sm, stride_om,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = offs_t < n_tokens
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(ACC)[None, :]
    for s in range(0, n_slots):
        pair = offs_t * n_slots + s
        # Dropped pairs (zero gates) own no routed row and their slot rows are never written.
        kept = tl.load(pair_row_ptr + pair, mask=t_mask, other=-1) >= 0
        v = tl.load(slot_ptr + pair[:, None] * stride_sm + offs_d[None, :],
                    mask=kept[:, None] & d_mask[None, :], other=0.0)
        acc += v.to(ACC)
    tl.store(out_ptr + offs_t[:, None] * stride_om + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & d_mask[None, :])


@triton.jit
def _xty_kernel(
    x_ptr, h_ptr, out_ptr, part_ptr, gate_ptr, chunk_ptr, row_pair_ptr,
    P, Q, n_slots,
    stride_xm, stride_xp, stride_hm, stride_ot, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.load(chunk_ptr + chunk * 4)
    if t < 0:
        return
    row_lo = tl.load(chunk_ptr + chunk * 4 + 1) * BLOCK_M
    row_hi = tl.load(chunk_ptr + chunk * 4 + 2) * BLOCK_M
    slot = tl.load(chunk_ptr + chunk * 4 + 3)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (tl.program_id(1) // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tl.program_id(1) % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p[:, None] < P
    q_mask = offs_q[None, :] < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), ACC)
    # The chunk's blocks are consecutive rows; BLOCK_K of them (dividing BLOCK_M) per step bound
    # the dot's K, which the FMA path of fp32/fp64 holds in registers.
    for row0 in range(row_lo, row_hi, BLOCK_K):
        rows = row0 + tl.arange(0, BLOCK_K)
        pair = tl.load(row_pair_ptr + rows)
        valid = pair >= 0
        tok = tl.where(valid, pair // n_slots, 0)
        # X^T tile loaded transposed: [BLOCK_P, BLOCK_K], contiguous along P.
        xt = tl.load(x_ptr + tok[None, :] * stride_xm + offs_p[:, None] * stride_xp,
                     mask=valid[None, :] & p_mask, other=0.0)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_q[None, :],
                    mask=valid[:, None] & q_mask, other=0.0)
        if GATED:
            gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
            h = (h.to(ACC) * gate[:, None]).to(h_ptr.dtype.element_ty)
        acc = tl.dot(xt, h, acc, input_precision="ieee")
    tile = offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    if slot < 0:
        tl.store(out_ptr + t * stride_ot + tile, acc.to(out_ptr.dtype.element_ty),
                 mask=p_mask & q_mask)
    else:
        tl.store(part_ptr + slot * stride_ot + tile, acc, mask=p_mask & q_mask)


@triton.jit
def _partial_sum_kernel(
    part_ptr, out_ptr, split_ptr, size,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.load(split_ptr + tl.program_id(0) * 3)
    if t < 0:
        return
    first = tl.load(split_ptr + tl.program_id(0) * 3 + 1)
    count = tl.load(split_ptr + tl.program_id(0) * 3 + 2)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), ACC)
    for j in range(0, count):
        acc += tl.load(part_ptr + (first + j) * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + t * size + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs: every tile size, warp count and pipeline depth is chosen here.
# ----------------------------------------------------------------------------------------------


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
    return min(cap, max(MIN_TILE, triton.next_power_of_2(size)))


def _launch(
    kind: str, acc_shape: tuple[int, int], acc_bytes: int, stage_bytes: int, **tiles: int
) -> Launch:
    big = kind == "full" or acc_shape[0] * acc_shape[1] * acc_bytes >= BIG_ACCUMULATOR_BYTES
    warps = BIG_WARPS if big else WARPS
    return Launch(tiles, warps, max(1, min(MAX_STAGES[kind], STAGE_BYTES // stage_bytes)))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bucket_config(
    rank: int, d_in: int, d_out: int, dtype: torch.dtype, rows_per_transform: float
) -> BucketConfig:
    """Every launch parameter of one bucket, from its rank, the widths, the input dtype and the
    expected pairs per transform."""
    kind = "half" if dtype in _HALF else "full"
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


# ----------------------------------------------------------------------------------------------
# Launch code
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels fill; tests poison it with NaN to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPE[accumulator_dtype(dtype)]


# While gpu_report_builds runs the launch code on meta tensors, launches are recorded here.
_recorded: list[tuple[triton.JITFunction, Launch, tuple, dict]] | None = None


def _run(kernel: triton.JITFunction, grid: tuple[int, ...], launch: Launch, *args, **kw) -> None:
    """Launch unless the grid is empty (zero tokens): Triton rejects empty grids."""
    if _recorded is not None:
        _recorded.append((kernel, launch, args, kw))
    elif all(grid):
        kernel[grid](*args, **launch.tiles, **kw, num_warps=launch.num_warps,
                     num_stages=launch.num_stages)


def _bucket_views(routing: Routing, b: int) -> tuple[Tensor, Tensor, int]:
    """(transform of each block, pair of each row) of bucket b's region, and its block count."""
    b0, b1 = routing.block_start[b], routing.block_start[b + 1]
    r0, r1 = routing.row_start[b], routing.row_start[b + 1]
    return routing.transform_of_block[b0:b1], routing.pair_of_row[r0:r1], b1 - b0


def _slot_sum(slots: Tensor, routing: Routing, bias: Tensor | None, out: Tensor) -> None:
    n_tokens, width = out.shape
    block_d = _pow2_tile(width, SLOT_SUM_WIDTH)
    grid = (triton.cdiv(n_tokens, SLOT_SUM_TOKENS), triton.cdiv(width, block_d))
    launch = Launch(dict(BLOCK_T=SLOT_SUM_TOKENS, BLOCK_D=block_d), WARPS, 1)
    _run(_slot_sum_kernel, grid, launch, slots, routing.row_of_pair,
         out if bias is None else bias, out, n_tokens, routing.n_slots, width,
         slots.stride(0), out.stride(0), HAS_BIAS=bias is not None, ACC=_acc(out.dtype))


def forward(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
) -> tuple[Tensor, Routing, list[Tensor]]:
    """y [N, d_out], the routing and h_pre[b] [row capacity of bucket b, r_b] (x's dtype).

    x [N, d_in]; gates [N, k] fp32 (fp64 for fp64 x); indices [N, k] int64; U[b] [n_b, d_out, r_b];
    V[b] [n_b, r_b, d_in]; b_dec [d_out]; floating inputs other than gates in x's dtype.
    """
    n_tokens, n_slots = indices.shape
    d_out = U[0].shape[1]
    configs = plan(n_tokens, n_slots, U, V, x.dtype)
    bucket_sizes = tuple(v.shape[0] for v in V)
    routing = route_pairs(indices, gates != 0, bucket_sizes, tuple(c.block_m for c in configs))
    x, gates, b_dec = x.contiguous(), gates.contiguous(), b_dec.contiguous()
    acc = _acc(x.dtype)
    slots = _empty((n_tokens * n_slots, d_out), x.dtype, x.device)
    h_pre = []
    t0 = 0
    for b, (u, v, cfg) in enumerate(zip(U, V, configs)):
        block_t, row_pair, n_blocks = _bucket_views(routing, b)
        h = _empty((n_blocks * cfg.block_m, v.shape[1]), x.dtype, x.device)
        grid = (n_blocks, triton.cdiv(v.shape[1], cfg.shrink_fwd.tiles["BLOCK_R"]))
        _run(_shrink_kernel, grid, cfg.shrink_fwd,
             x, v, h, h, gates, gates, block_t, row_pair, x.shape[1], n_slots, t0,
             x.stride(0), x.stride(1), v.stride(0), v.stride(1), v.stride(2), h.stride(0), 0,
             R=v.shape[1], BACKWARD=False, ACC=acc)
        grid = (n_blocks, triton.cdiv(d_out, cfg.expand_fwd.tiles["BLOCK_N"]))
        _run(_expand_kernel, grid, cfg.expand_fwd,
             h, u, slots, gates, block_t, row_pair, d_out, t0,
             h.stride(0), u.stride(0), u.stride(2), u.stride(1), slots.stride(0),
             R=v.shape[1], GATED=True, ACC=acc)
        h_pre.append(h)
        t0 += v.shape[0]
    y = _empty((n_tokens, d_out), x.dtype, x.device)
    _slot_sum(slots, routing, b_dec, y)
    return y, routing, h_pre


def split_chunks(counts: Tensor, block_m: int, splits: int) -> tuple[Tensor, Tensor]:
    """Chunks of a bucket's blocks for the grouped X^T Y, computed on the device.

    counts [n_b] int64: pairs per transform. Returns chunk [n_b + splits, 4] int64 rows
    (transform, first block, end block, partial slot or -1) and split [splits // 2, 3] int64 rows
    (transform, first partial slot, chunk count) of the split transforms; transform -1 marks
    surplus rows. Every transform gets one chunk (empty ones write zeros); a hot one gets up to
    ceil(count / MIN_CHUNK_ROWS) chunks, at most splits * count / (pairs in the bucket), so the
    split transforms, each with >= 2 chunks, use <= ``splits`` slots and number <= splits // 2.
    """
    n_b = counts.shape[0]
    long = dict(dtype=torch.int64, device=counts.device)
    blocks = (counts + block_m - 1) // block_m
    first_block = torch.cumsum(blocks, 0) - blocks
    total = counts.sum().clamp_min(1)
    want = torch.minimum((counts + MIN_CHUNK_ROWS - 1) // MIN_CHUNK_ROWS, splits * counts // total)
    n_chunks = torch.minimum(want, blocks).clamp_min(1)
    split = n_chunks > 1
    slots = torch.where(split, n_chunks, 0)
    first_slot = torch.cumsum(slots, 0) - slots
    chunk_end = torch.cumsum(n_chunks, 0)

    c = torch.arange(n_b + splits, **long)
    owner = torch.searchsorted(chunk_end, c, right=True)
    t = owner.clamp(max=n_b - 1)
    i = c - (chunk_end - n_chunks)[t]
    # Near-equal block ranges per chunk.
    lo = first_block[t] + i * blocks[t] // n_chunks[t]
    hi = first_block[t] + (i + 1) * blocks[t] // n_chunks[t]
    slot = torch.where(split[t], first_slot[t] + i, -1)
    chunk = torch.stack([torch.where(owner < n_b, t, -1), lo, hi, slot], 1)

    j = torch.arange(splits // 2, **long)
    owner = torch.searchsorted(torch.cumsum(split, 0), j, right=True)
    t = owner.clamp(max=n_b - 1)
    split_rows = torch.stack([torch.where(owner < n_b, t, -1), first_slot[t], n_chunks[t]], 1)
    return chunk, split_rows


def _grouped_xty(
    x: Tensor, h: Tensor, gates: Tensor | None, routing: Routing, b: int, t0: int,
    out: Tensor, transposed: bool, launch: Launch, splits: int,
) -> None:
    """out[t] = X[token(rows of t)]^T (g) H[rows of t] for every transform t of bucket b.

    x [N, P]; h [row capacity, Q]; out [n_b, P, Q], or [n_b, Q, P] if ``transposed``, contiguous.
    """
    n_b = out.shape[0]
    P, Q = x.shape[1], h.shape[1]
    stride_op, stride_oq = out.stride(2 if transposed else 1), out.stride(1 if transposed else 2)
    chunk, split = split_chunks(routing.pair_counts[t0 : t0 + n_b], routing.block_m[b], splits)
    _, row_pair, _ = _bucket_views(routing, b)
    acc_dtype = accumulator_dtype(x.dtype)
    # One element at least: a launch needs a valid pointer even when nothing splits.
    part = _empty((max(splits * P * Q, 1),), acc_dtype, x.device)
    tiles = triton.cdiv(P, launch.tiles["BLOCK_P"]) * triton.cdiv(Q, launch.tiles["BLOCK_Q"])
    _run(_xty_kernel, (n_b + splits, tiles), launch,
         x, h, out, part, gates if gates is not None else part, chunk, row_pair,
         P, Q, routing.n_slots,
         x.stride(0), x.stride(1), h.stride(0), out.stride(0), stride_op, stride_oq,
         GATED=gates is not None, ACC=_TL_DTYPE[acc_dtype])
    sum_launch = Launch(dict(BLOCK=PARTIAL_SUM_BLOCK), WARPS, 1)
    _run(_partial_sum_kernel, (splits // 2, triton.cdiv(P * Q, PARTIAL_SUM_BLOCK)), sum_launch,
         part, out, split, P * Q, ACC=_TL_DTYPE[acc_dtype])


def backward(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    routing: Routing,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    h_pre: Sequence[Tensor],
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """Gradients (dx [N, d_in], dgates [N, k], dU, dV) for ``needs`` = (x, gates, U, V).

    grad_y [N, d_out] in x's dtype; the rest as returned by / passed to :func:`forward`.
    """
    need_x, need_g, need_u, need_v = needs
    n_tokens, n_slots = gates.shape
    configs = plan(n_tokens, n_slots, U, V, x.dtype)
    x, gates, grad_y = x.contiguous(), gates.contiguous(), grad_y.contiguous()
    acc = _acc(x.dtype)
    d_in = x.shape[1]
    # dgate per rank tile; dropped pairs get no program: their gradient is the zero they start from.
    rank_tiles = max(triton.cdiv(v.shape[1], c.shrink_bwd.tiles["BLOCK_R"])
                     for v, c in zip(V, configs))
    dgates = torch.zeros(rank_tiles, n_tokens * n_slots, dtype=gates.dtype, device=x.device)
    dx_slots = _empty((n_tokens * n_slots, d_in), x.dtype, x.device) if need_x else None
    dU = [_empty(tuple(u.shape), u.dtype, u.device) for u in U] if need_u else None
    dV = [_empty(tuple(v.shape), v.dtype, v.device) for v in V] if need_v else None
    t0 = 0
    for b, (u, v, h, cfg) in enumerate(zip(U, V, h_pre, configs)):
        block_t, row_pair, n_blocks = _bucket_views(routing, b)
        r = v.shape[1]
        if need_u:
            _grouped_xty(grad_y, h, gates, routing, b, t0, dU[b], False, cfg.grad_u, cfg.splits_u)
        if need_g or need_x or need_v:
            dh = _empty(tuple(h.shape), x.dtype, x.device)
            grid = (n_blocks, triton.cdiv(r, cfg.shrink_bwd.tiles["BLOCK_R"]))
            _run(_shrink_kernel, grid, cfg.shrink_bwd,
                 grad_y, u, h, dh, gates, dgates, block_t, row_pair, grad_y.shape[1], n_slots, t0,
                 grad_y.stride(0), grad_y.stride(1), u.stride(0), u.stride(2), u.stride(1),
                 h.stride(0), dgates.stride(0), R=r, BACKWARD=True, ACC=acc)
            if need_x:
                grid = (n_blocks, triton.cdiv(d_in, cfg.expand_bwd.tiles["BLOCK_N"]))
                _run(_expand_kernel, grid, cfg.expand_bwd,
                     dh, v, dx_slots, gates, block_t, row_pair, d_in, t0,
                     dh.stride(0), v.stride(0), v.stride(1), v.stride(2), dx_slots.stride(0),
                     R=r, GATED=False, ACC=acc)
            if need_v:
                _grouped_xty(x, dh, None, routing, b, t0, dV[b], True, cfg.grad_v, cfg.splits_v)
        t0 += v.shape[0]
    dx = None
    if need_x:
        dx = _empty((n_tokens, d_in), x.dtype, x.device)
        _slot_sum(dx_slots, routing, None, dx)
    # A fixed-order sum over at most R / BLOCK_R tiles.
    dgates = dgates.sum(0).view(n_tokens, n_slots) if need_g else None
    return dx, dgates, dU, dV


# ----------------------------------------------------------------------------------------------
# GPU report
# ----------------------------------------------------------------------------------------------

# One rank per tile class (BLOCK_R 32 / 64 masked / 128 with a rank loop), at the paper's width.
REPORT_RANKS, REPORT_WIDTH, REPORT_SLOTS, REPORT_TRANSFORMS = (32, 48, 512), 2304, 8, 64
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64", torch.int64: "i64"}


def _arg_type(value: object) -> str:
    """Triton's type for a launch argument, with the JIT's divisibility-by-16 specialisation."""
    if isinstance(value, Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    base = "i32" if -(2**31) <= value < 2**31 else "i64"
    return base + (":16" if value % 16 == 0 else "")


def _report_build(
    dtype: torch.dtype, kernel: triton.JITFunction, launch: Launch, args: tuple, kw: dict
) -> KernelBuild:
    """The KernelBuild of one recorded launch for inputs of ``dtype``."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | launch.tiles | kw
    # The JIT turns integer arguments equal to 1 (unit strides) into constants.
    constexprs = {
        n: v for n, v in values.items()
        if n in launch.tiles or n in kw or (type(v) is int and v == 1)
    }
    signature = {n: "constexpr" if n in constexprs else _arg_type(values[n]) for n in names}
    label = [_TYPE_NAMES[dtype]]
    label += [f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in kw.items() if n != "ACC"]
    label += [f"{n}={v}" for n, v in launch.tiles.items()]
    label += [f"w{launch.num_warps}s{launch.num_stages}"]
    return KernelBuild(
        name=f"lowrank{kernel.fn.__name__.removesuffix('_kernel')}",
        config=",".join(label),
        fn=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )


def _recorded_launches(dtype: torch.dtype, rank: int, n_tokens: int) -> list[tuple]:
    """(kernel, launch, args, kwargs) of a forward and backward of one bucket, on meta tensors."""
    global _recorded
    meta = dict(device=torch.device("meta"))
    n, width, k = REPORT_TRANSFORMS, REPORT_WIDTH, REPORT_SLOTS
    U = [torch.empty(n, width, rank, dtype=dtype, **meta)]
    V = [torch.empty(n, rank, width, dtype=dtype, **meta)]
    x = torch.empty(n_tokens, width, dtype=dtype, **meta)
    gates = torch.empty(n_tokens, k, dtype=accumulator_dtype(dtype), **meta)
    indices = torch.empty(n_tokens, k, dtype=torch.int64, **meta)
    b_dec = torch.empty(width, dtype=dtype, **meta)
    _recorded = []
    try:
        y, routing, h_pre = forward(x, gates, indices, U, V, b_dec)
        backward(y, x, gates, routing, U, V, h_pre, (True, True, True, True))
        return _recorded
    finally:
        _recorded = None


def gpu_report_builds() -> list[KernelBuild]:
    """Every (kernel, config) the launch code picks at width 2304, for each input dtype, one rank
    per rank-tile class and every BLOCK_M, captured from a forward and backward on meta tensors."""
    builds: dict[tuple[str, str], KernelBuild] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for rank in REPORT_RANKS:
            block_m = MIN_TILE
            while block_m <= MAX_BLOCK_M:
                # Uniform routing: n_tokens * k / T pairs per transform, BLOCK_M half of that.
                n_tokens = 2 * block_m * REPORT_TRANSFORMS // REPORT_SLOTS
                for launch in _recorded_launches(dtype, rank, n_tokens):
                    build = _report_build(dtype, *launch)
                    builds.setdefault((build.name, build.config), build)
                block_m *= 2
    return list(builds.values())
