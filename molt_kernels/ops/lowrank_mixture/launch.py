"""Launch code of the MOLT decode: routing, buffers and grids per bucket, configs from
``ops.configs``; ``kernels.py`` says what each kernel computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..configs import (
    MIN_CHUNK_ROWS,
    PARTIAL_SUM_BLOCK,
    SLOT_SUM_TOKENS,
    SLOT_SUM_WIDTH,
    WARPS,
    Launch,
    _pow2_tile,
    plan,
)
from ..dtypes import accumulator_dtype
from ..routing import Routing, route_pairs
from .kernels import (
    _expand_kernel,
    _partial_sum_kernel,
    _shrink_kernel,
    _slot_sum_kernel,
    _xty_kernel,
)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels fill; tests poison it with NaN to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPE[accumulator_dtype(dtype)]


class Runner(Protocol):
    """Runs one kernel launch; the gpu-report passes one that records launches instead."""

    def __call__(
        self, kernel: triton.JITFunction, grid: tuple[int, ...], launch: Launch, *args, **kw
    ) -> None: ...


def launch_kernel(
    kernel: triton.JITFunction, grid: tuple[int, ...], launch: Launch, *args, **kw
) -> None:
    """Launch unless the grid is empty (zero tokens): Triton rejects empty grids."""
    if all(grid):
        kernel[grid](*args, **launch.tiles, **kw, num_warps=launch.num_warps,
                     num_stages=launch.num_stages)


def _bucket_views(routing: Routing, b: int) -> tuple[Tensor, Tensor, int]:
    """(transform of each block, pair of each row) of bucket b's region, and its block count."""
    b0, b1 = routing.block_start[b], routing.block_start[b + 1]
    r0, r1 = routing.row_start[b], routing.row_start[b + 1]
    return routing.transform_of_block[b0:b1], routing.pair_of_row[r0:r1], b1 - b0


def _slot_sum(
    slots: Tensor, routing: Routing, bias: Tensor | None, out: Tensor, run: Runner
) -> None:
    n_tokens, width = out.shape
    block_d = _pow2_tile(width, SLOT_SUM_WIDTH)
    grid = (triton.cdiv(n_tokens, SLOT_SUM_TOKENS), triton.cdiv(width, block_d))
    launch = Launch(dict(BLOCK_T=SLOT_SUM_TOKENS, BLOCK_D=block_d), WARPS, 1)
    run(_slot_sum_kernel, grid, launch, slots, routing.row_of_pair,
         out if bias is None else bias, out, n_tokens, routing.n_slots, width,
         slots.stride(0), out.stride(0), HAS_BIAS=bias is not None, ACC=_acc(out.dtype))


def forward(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
    run: Runner = launch_kernel,
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
        run(_shrink_kernel, grid, cfg.shrink_fwd,
             x, v, h, h, gates, gates, block_t, row_pair, x.shape[1], n_slots, t0,
             x.stride(0), x.stride(1), v.stride(0), v.stride(1), v.stride(2), h.stride(0), 0,
             R=v.shape[1], BACKWARD=False, ACC=acc)
        grid = (n_blocks, triton.cdiv(d_out, cfg.expand_fwd.tiles["BLOCK_N"]))
        run(_expand_kernel, grid, cfg.expand_fwd,
             h, u, slots, gates, block_t, row_pair, d_out, t0,
             h.stride(0), u.stride(0), u.stride(2), u.stride(1), slots.stride(0),
             R=v.shape[1], GATED=True, ACC=acc)
        h_pre.append(h)
        t0 += v.shape[0]
    y = _empty((n_tokens, d_out), x.dtype, x.device)
    _slot_sum(slots, routing, b_dec, y, run)
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
    out: Tensor, transposed: bool, launch: Launch, splits: int, run: Runner,
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
    run(_xty_kernel, (n_b + splits, tiles), launch,
         x, h, out, part, gates if gates is not None else part, chunk, row_pair,
         P, Q, routing.n_slots,
         x.stride(0), x.stride(1), h.stride(0), out.stride(0), stride_op, stride_oq,
         GATED=gates is not None, ACC=_TL_DTYPE[acc_dtype])
    sum_launch = Launch(dict(BLOCK=PARTIAL_SUM_BLOCK), WARPS, 1)
    run(_partial_sum_kernel, (splits // 2, triton.cdiv(P * Q, PARTIAL_SUM_BLOCK)), sum_launch,
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
    run: Runner = launch_kernel,
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
            _grouped_xty(grad_y, h, gates, routing, b, t0, dU[b], False, cfg.grad_u, cfg.splits_u,
                         run)
        if need_g or need_x or need_v:
            dh = _empty(tuple(h.shape), x.dtype, x.device)
            grid = (n_blocks, triton.cdiv(r, cfg.shrink_bwd.tiles["BLOCK_R"]))
            run(_shrink_kernel, grid, cfg.shrink_bwd,
                 grad_y, u, h, dh, gates, dgates, block_t, row_pair, grad_y.shape[1], n_slots, t0,
                 grad_y.stride(0), grad_y.stride(1), u.stride(0), u.stride(2), u.stride(1),
                 h.stride(0), dgates.stride(0), R=r, BACKWARD=True, ACC=acc)
            if need_x:
                grid = (n_blocks, triton.cdiv(d_in, cfg.expand_bwd.tiles["BLOCK_N"]))
                run(_expand_kernel, grid, cfg.expand_bwd,
                     dh, v, dx_slots, gates, block_t, row_pair, d_in, t0,
                     dh.stride(0), v.stride(0), v.stride(1), v.stride(2), dx_slots.stride(0),
                     R=r, GATED=False, ACC=acc)
            if need_v:
                _grouped_xty(x, dh, None, routing, b, t0, dV[b], True, cfg.grad_v, cfg.splits_v,
                             run)
        t0 += v.shape[0]
    dx = None
    if need_x:
        dx = _empty((n_tokens, d_in), x.dtype, x.device)
        _slot_sum(dx_slots, routing, None, dx, run)
    # A fixed-order sum over at most R / BLOCK_R tiles.
    dgates = dgates.sum(0).view(n_tokens, n_slots) if need_g else None
    return dx, dgates, dU, dV
