"""Sparse MOLT decode in plain PyTorch, over the block layout of ``ops.routing``.

Per bucket, rows are gathered block by block (each block belongs to one transform) and multiplied
with that transform's weights by a batched matmul, so work scales with the routed pairs, never with
T or sum(r). Weights are gathered per block; blocks are processed in chunks so that the gathered
weights stay under ``CHUNK_BYTES``. Scatter-adds run in row order on the CPU, so results are
deterministic there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..routing import Routing, bucket_starts

CHUNK_BYTES = 4 << 20
MIN_BLOCK_M, MAX_BLOCK_M = 8, 64


def block_sizes(n_tokens: int, n_slots: int, bucket_sizes: Sequence[int]) -> tuple[int, ...]:
    """BLOCK_M per bucket: about the expected pairs per transform, as a power of two.

    Padding costs < BLOCK_M rows per active transform, so many transforms with few pairs each want
    small blocks; larger blocks amortise the per-block weight gather.
    """
    n_transforms = sum(bucket_sizes)
    expected = n_tokens * min(n_slots, n_transforms) / max(n_transforms, 1)
    m = 1 << max(0, math.ceil(math.log2(max(expected, 1.0))))
    return (min(MAX_BLOCK_M, max(MIN_BLOCK_M, m)),) * len(bucket_sizes)


def _used_blocks(routing: Routing) -> list[int]:
    """Blocks holding pairs, per bucket, read to the host.

    Under torch.compile these are unbacked sizes, bounded here by the bucket capacities so that
    slices and views of them trace without a graph break.
    """
    used = routing.blocks_used.tolist()
    if torch.compiler.is_compiling():
        for bucket, n in enumerate(used):
            torch._check(n >= 0)
            torch._check(n <= routing.block_capacity(bucket))
    return used


def _chunks(
    routing: Routing, bucket: int, used: int, rank: int, width: int, elem: int
) -> Iterator[slice]:
    """Block ranges of one bucket whose gathered rows and weights fit in CHUNK_BYTES together.

    A block gathers BLOCK_M rows and a rank x width weight, each <= width wide. Small chunks keep
    every temporary under the allocator's mmap threshold: a fresh mapping per large buffer costs
    more in page faults than the matmul it feeds, and it sets the peak memory. Under
    torch.compile ``used`` is a data-dependent size, which a Python loop cannot range over: the
    bucket is then one chunk (more memory, same results).
    """
    b0 = routing.block_start[bucket]
    if torch.compiler.is_compiling():
        yield slice(b0, b0 + used)
        return
    per_block = (routing.block_m[bucket] + rank) * width * elem
    step = max(1, CHUNK_BYTES // max(1, per_block))
    for lo in range(b0, b0 + used, step):
        yield slice(lo, min(lo + step, b0 + used))


def _take(t: Tensor, span: slice) -> Tensor:
    """t[span.start : span.stop] as a narrow: under torch.compile its length is exactly
    ``span.stop - span.start`` (a slice would clamp a data-dependent end: a new unbacked size)."""
    return t.narrow(0, span.start, span.stop - span.start)


def _rows(routing: Routing, bucket: int, blocks: slice) -> slice:
    m = routing.block_m[bucket]
    b0 = routing.block_start[bucket]
    r0 = routing.row_start[bucket]
    return slice(r0 + (blocks.start - b0) * m, r0 + (blocks.stop - b0) * m)


def _with_sink(t: Tensor) -> Tensor:
    """``t`` with one zero row appended: padding rows gather zeros from it and scatter into it."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def _row_ids(routing: Routing, rows: slice, n_pairs: int) -> tuple[Tensor, Tensor]:
    """(pair id, token id) of the rows; padding rows point at the sink entries n_pairs and N."""
    pair = _take(routing.pair_of_row, rows)
    pair = torch.where(pair >= 0, pair, n_pairs)
    return pair, pair // routing.n_slots


def forward(
    x: Tensor,
    gates: Tensor,
    routing: Routing,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """y [N, d_out] and the ungated rank-space activations h_pre[b] [used blocks of b, BLOCK_M_b,
    r_b] (padding rows hold zeros)."""
    n_tokens, n_pairs = x.shape[0], gates.numel()
    x_ext, gates_ext = _with_sink(x), _with_sink(gates.reshape(-1, 1)).view(-1)
    y_ext = _with_sink(b_dec.expand(n_tokens, -1))
    used_blocks = _used_blocks(routing)
    first_t = bucket_starts([v.shape[0] for v in V])
    h_pre_all = []
    for b, (u, v) in enumerate(zip(U, V)):
        m, r = routing.block_m[b], v.shape[1]
        h_parts = []
        for blocks in _chunks(
            routing, b, used_blocks[b], r, max(v.shape[2], u.shape[1]), x.element_size()
        ):
            pair, tok = _row_ids(routing, _rows(routing, b, blocks), n_pairs)
            t = _take(routing.transform_of_block, blocks) - first_t[b]
            h_pre = torch.bmm(
                x_ext.index_select(0, tok).view(-1, m, x.shape[1]),
                v.index_select(0, t).transpose(1, 2),
            )
            g = gates_ext.index_select(0, pair).to(h_pre.dtype).view(-1, m, 1)
            out = torch.bmm(h_pre * g, u.index_select(0, t).transpose(1, 2))
            y_ext.index_add_(0, tok, out.reshape(-1, out.shape[-1]))
            h_parts.append(h_pre)
        h_pre_all.append(torch.cat(h_parts) if h_parts else x.new_zeros(0, m, r))
    return y_ext[:n_tokens], h_pre_all


def backward(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    routing: Routing,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    h_pre_all: Sequence[Tensor],
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """Gradients (dx, dgates, dU, dV); ``needs`` flags which of them to compute.

    dgate = rowsum(dY_rows @ U_t * h_pre) in rank space; dU_t = dY_rows^T (g h_pre);
    dV_t = (g dY_rows U_t)^T X_rows; dx = (g dY_rows U_t) V_t.
    """
    need_x, need_g, need_u, need_v = needs
    n_tokens, n_pairs = x.shape[0], gates.numel()
    x_ext, dy_ext = _with_sink(x), _with_sink(grad_y)
    gates_ext = _with_sink(gates.reshape(-1, 1)).view(-1)
    dx_ext = torch.zeros_like(x_ext) if need_x else None
    dgates_ext = torch.zeros_like(gates_ext, dtype=grad_y.dtype) if need_g else None
    dU = [torch.zeros_like(u) for u in U] if need_u else None
    dV = [torch.zeros_like(v) for v in V] if need_v else None
    # h_pre[b] covers the used blocks of bucket b: no second read of the routing on the host.
    used_blocks = [h.shape[0] for h in h_pre_all]
    first_t = bucket_starts([v.shape[0] for v in V])
    for b, (u, v) in enumerate(zip(U, V)):
        m, r, b0 = routing.block_m[b], v.shape[1], routing.block_start[b]
        for blocks in _chunks(
            routing, b, used_blocks[b], r, max(v.shape[2], u.shape[1]), x.element_size()
        ):
            pair, tok = _row_ids(routing, _rows(routing, b, blocks), n_pairs)
            t = _take(routing.transform_of_block, blocks) - first_t[b]
            h_pre = _take(h_pre_all[b], slice(blocks.start - b0, blocks.stop - b0))
            dy = dy_ext.index_select(0, tok).view(-1, m, grad_y.shape[1])
            g = gates_ext.index_select(0, pair).to(h_pre.dtype).view(-1, m, 1)
            dh = torch.bmm(dy, u.index_select(0, t))
            if need_g:
                dgates_ext.index_add_(0, pair, (dh * h_pre).sum(-1).reshape(-1))
            if need_u:
                dU[b].index_add_(0, t, torch.bmm(dy.transpose(1, 2), h_pre * g))
            dh_pre = dh * g
            if need_v:
                xg = x_ext.index_select(0, tok).view(-1, m, x.shape[1])
                dV[b].index_add_(0, t, torch.bmm(dh_pre.transpose(1, 2), xg))
            if need_x:
                dx_ext.index_add_(
                    0, tok, torch.bmm(dh_pre, v.index_select(0, t)).reshape(-1, x.shape[1])
                )
    dx = dx_ext[:n_tokens] if need_x else None
    dgates = dgates_ext[:n_pairs].view(gates.shape) if need_g else None
    return dx, dgates, dU, dV
