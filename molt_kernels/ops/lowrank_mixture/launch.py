"""Launch code of the MOLT decode: the block table (``route``), buffers and one grid per phase;
configs from ``ops.configs``; ``kernels.py`` says what each kernel computes.

A forward is routing (PyTorch ops, no host sync) + 2 launches (shrink, expand); a backward 4
(shrink, dx expand, dU and dV X^T Y), whatever the number of rank buckets, plus 3 (the split
plan, and a chunk reduction after each X^T Y) when a transform can hold more than one X^T Y
chunk. The default "fixed" combine adds 2 per expand (its prologue: weight norms and zero fill;
the cast out).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..configs import (
    XTY_REDUCE_PROGRAMS,
    MixtureConfig,
    MixtureLayout,
    apply_tuning,
    arch_of,
    autotune,
    autotune_enabled,
    default_combine,
    plan,
    tuning_candidates,
    tuning_key,
)
from ..dtypes import accumulator_dtype, dot_precision
from ..runtime import triton_interpreting
from .kernels import (
    INFO_COLUMNS,
    _expand_kernel,
    _fixed_finish_kernel,
    _fixed_prologue_kernel,
    _shrink_kernel,
    _xty_kernel,
    _xty_plan_kernel,
    _xty_reduce_kernel,
)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


class BlockTable(NamedTuple):
    """Routing of the decode; every tensor int64 and fully written.

    pair_of_row [n_rows]: flat pair id (token * slots + slot) of each row, -1 on padding rows;
    block_t [n_blocks]: transform of each block, -1 past the used blocks;
    block_h [n_blocks + 1]: first element of each block's rows in h_pre (the total last);
    t_block_start [T + 1]: first block of each transform;
    range_blocks [n_blocks]: block ids in token-range order; range_start [ranges + 1];
    block_order [n_blocks]: block ids in L2-window order (windows of ``layout.window_ranges``
    token ranges; within one, table order, i.e. by transform), the unused blocks last in place;
    blocks_used [1].
    """

    pair_of_row: Tensor
    block_t: Tensor
    block_h: Tensor
    t_block_start: Tensor
    range_blocks: Tensor
    range_start: Tensor
    block_order: Tensor
    blocks_used: Tensor


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels fill; tests poison it with NaN to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPE[accumulator_dtype(dtype)]


def _dot_fp32(dtype: torch.dtype) -> bool:
    # triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits in tl.dot; on the
    # GPU the tiles always go to the tensor cores in their own dtype.
    return dtype == torch.bfloat16 and triton_interpreting()


class Runner(Protocol):
    """Runs one kernel launch; the gpu-report passes one that records launches instead."""

    def __call__(
        self, kernel: triton.JITFunction, grid: tuple[int, ...], launch, *args, **kw
    ) -> None: ...


def launch_kernel(kernel: triton.JITFunction, grid: tuple[int, ...], launch, *args, **kw) -> None:
    """Launch unless the grid is empty (zero tokens): Triton rejects empty grids."""
    if all(grid):
        kernel[grid](*args, **launch.tiles, **kw, num_warps=launch.num_warps,
                     num_stages=launch.num_stages)


@functools.lru_cache(maxsize=64)
def _bucket_tables(
    ranks: tuple[int, ...], counts: tuple[int, ...], block_q: int, device: torch.device
) -> tuple[Tensor, Tensor, int]:
    """(binfo [B, INFO_COLUMNS], rank of each transform [T], X^T Y items), built once per shape so a
    step makes no host-to-device copy (and can be captured in a CUDA graph after a warm-up).

    binfo row b: first transform, rank, first X^T Y item, rank rows (sum n r) before b.
    """
    rows, t0, item, rank_rows = [], 0, 0, 0
    for r, n in zip(ranks, counts):
        rows.append([t0, r, item, rank_rows])
        t0, item, rank_rows = t0 + n, item + n * triton.cdiv(r, block_q), rank_rows + n * r
    binfo = torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(ranks), INFO_COLUMNS)
    rank_of_t = torch.repeat_interleave(
        torch.tensor(ranks, dtype=torch.int64, device=device),
        torch.tensor(counts, device=device), output_size=t0)
    return binfo, rank_of_t, item


@functools.lru_cache(maxsize=256)
def _ids(n: int, device: torch.device) -> Tensor:
    """0, 1, ..., n - 1 (int64), built once per size (no op in the step): token, pair, segment
    and block ids, and the block table order."""
    return torch.arange(n, dtype=torch.int64, device=device)


def route(indices: Tensor, gates: Tensor, rank_of_t: Tensor, layout: MixtureLayout) -> BlockTable:
    """The block table of the kept pairs (gate != 0) of ``indices`` [N, S], sorted by segment
    (transform, token range) and, within one, by flat pair id; padded per segment to BLOCK_M.

    No host synchronisation: every size comes from ``layout``. Pairs beyond
    ``layout.pair_capacity`` (only possible when S exceeds MAX_MEAN_PAIRS_PER_TOKEN) trip a
    device-side assert.
    """
    n_tokens, n_slots = indices.shape
    n_transforms = rank_of_t.shape[0]
    m, n_ranges = layout.block_m, layout.n_ranges
    n_seg = n_transforms * n_ranges
    long = dict(dtype=torch.int64, device=indices.device)
    keep = (gates != 0).reshape(-1)
    if layout.pair_capacity < keep.numel():
        kept = torch.cumsum(keep, 0)
        torch._assert_async(kept[-1] <= layout.pair_capacity,
                            "more active pairs than the decode's pair capacity")
        keep = keep & (kept <= layout.pair_capacity)
    token_range = _ids(n_tokens, indices.device) // layout.range_tokens
    segment = indices * n_ranges + token_range[:, None]
    key = torch.where(keep, segment.reshape(-1), n_seg)
    key, order = torch.sort(key, stable=True)
    # key is sorted: segment s holds the pairs from its first position to the next segment's.
    seg_start = torch.searchsorted(key, _ids(n_seg + 1, indices.device))
    pair_start = seg_start[:-1]
    counts = seg_start[1:] - pair_start
    blocks = (counts + m - 1) // m
    block_end = torch.cumsum(blocks, 0)
    valid = key < n_seg
    seg = key.clamp(max=max(n_seg - 1, 0))
    row = (block_end - blocks)[seg] * m + _ids(key.numel(), indices.device) - pair_start[seg]
    # Dropped pairs write -1 to row 0, which the max keeps for a routed pair if it has one.
    row = torch.where(valid, row, 0)
    pair_of_row = torch.full((layout.n_rows,), -1, **long).scatter_reduce_(
        0, row, torch.where(valid, order, -1), "amax")
    seg_of_block = torch.searchsorted(block_end, _ids(layout.n_blocks, indices.device),
                                      right=True)
    used = seg_of_block < n_seg
    seg_of_block = seg_of_block.clamp(max=max(n_seg - 1, 0))
    block_t = torch.where(used, seg_of_block // n_ranges, -1)
    block_h = torch.zeros(layout.n_blocks + 1, **long)
    torch.cumsum(torch.where(used, rank_of_t[block_t.clamp(min=0)] * m, 0), 0,
                 out=block_h[1:])
    t_block_start = torch.zeros(n_transforms + 1, **long)
    t_block_start[1:] = block_end[n_ranges - 1 :: n_ranges]
    block_range = torch.where(used, seg_of_block % n_ranges, n_ranges)
    sorted_range, range_blocks = torch.sort(block_range, stable=True)
    range_start = torch.searchsorted(sorted_range, _ids(n_ranges + 1, indices.device))
    # Unused blocks (range n_ranges) form the last window and keep their place in it. One window
    # is table order, one range per window is range order: neither costs a sort.
    if layout.window_ranges >= n_ranges:
        block_order = _ids(layout.n_blocks, indices.device)
    elif layout.window_ranges == 1:
        block_order = range_blocks
    else:
        block_order = torch.sort(block_range // layout.window_ranges, stable=True).indices
    return BlockTable(pair_of_row, block_t, block_h, t_block_start, range_blocks, range_start,
                      block_order, block_end[-1:].clone())


def _weight_args(weights: Sequence[Tensor]) -> list[Tensor]:
    """One pointer argument per bucket, padded to 8 with the first (never read)."""
    ws = [w.contiguous() for w in weights]
    return ws + [ws[0]] * (8 - len(ws))


class FixedCombine(NamedTuple):
    """The "fixed" combine's buffers, views of one int32 allocation that its prologue zeroes
    before the shrink that feeds it: the expanding weights' norms [T] (fp32 bits), the token
    rows' (max pair bound as fp32 bits, pair count) [2, N], which the shrink fills and the row
    exponents come from, and the fixed-point accumulator [N, width]."""

    norms: Tensor
    row_stat: Tensor
    acc: Tensor


def _fixed_combine(
    weights: Sequence[Tensor], n_tokens: int, binfo: Tensor, n_transforms: int, rank_major: bool,
    cfg: MixtureConfig, run: Runner,
) -> FixedCombine | None:
    """The buffers and weight norms of the "fixed" combine of ``weights`` (U [n, width, r]
    forward, V [n, r, width] backward: ``rank_major``); None for the other combines."""
    if cfg.layout.combine != "fixed":
        return None
    width = weights[0].shape[2 if rank_major else 1]
    flat = _empty((n_transforms + n_tokens * (2 + width),), torch.int32, weights[0].device)
    norms = flat[:n_transforms].view(torch.float32)
    zeroed = flat[n_transforms:]  # the prologue zeroes it (one op fewer than torch.zeros)
    row_stat = zeroed[: 2 * n_tokens].view(2, n_tokens)
    acc = zeroed[2 * n_tokens :].view(n_tokens, width)
    run(_fixed_prologue_kernel, (n_transforms,), cfg.fixed_prologue, *_weight_args(weights),
        norms, binfo, zeroed, width, zeroed.numel(), N_BUCKETS=len(weights),
        RANK_MAJOR=rank_major)
    return FixedCombine(norms, row_stat, acc)


def _bound_args(fixed: FixedCombine | None, placeholder: Tensor) -> tuple[Tensor, Tensor]:
    """The shrink's (norms, row_stat) arguments: the fixed combine's, else a placeholder the
    shrink never reads (BOUND off)."""
    return (fixed.norms, fixed.row_stat) if fixed is not None else (placeholder, placeholder)


def _expand(
    h: Tensor, weights: Sequence[Tensor], out: Tensor, bias: Tensor | None, gates: Tensor | None,
    table: BlockTable, binfo: Tensor, cfg_launch, cfg: MixtureConfig, n_slots: int,
    common: dict, run: Runner, fixed: FixedCombine | None,
) -> None:
    """out [N, width] = (bias) + sum over each token's blocks of (g) H @ W_t, by the layout's
    combine (``configs.COMBINES``):

    "fixed" (``fixed``: its buffers, the row bounds filled by the shrink): a program per (block,
    width tile) in window order adds fixed-point rows at their row's scale into the int32
    accumulator with integer atomics, then the cast out.
    "ranges": a program per (token range, width tile) adds its range's blocks in table order.
    "atomic": as "fixed" with fp32 atomics into a buffer holding the bias (run-to-run rounding
    differences).
    """
    layout = cfg.layout
    n_tokens, width = out.shape
    acc_dtype = accumulator_dtype(out.dtype)
    scratch = acc_dtype != out.dtype
    if fixed is not None:
        acc, row_stat = fixed.acc, fixed.row_stat
    else:
        acc = _empty((n_tokens, width), acc_dtype, out.device) if scratch else out
        row_stat = out  # never read
        if layout.combine == "atomic":
            if bias is None:
                acc.zero_()
            else:
                acc.copy_(bias.expand(n_tokens, width))
    programs = layout.n_ranges if layout.combine == "ranges" else layout.n_blocks
    grid = (programs, triton.cdiv(width, cfg_launch.tiles["BLOCK_N"]))
    run(_expand_kernel, grid, cfg_launch,
        h, *_weight_args(weights), acc, out, bias if bias is not None else out,
        gates if gates is not None else out, table.range_blocks, table.range_start,
        table.block_order, table.block_t, table.block_h, table.pair_of_row, binfo, row_stat,
        width, n_tokens, layout.range_tokens, n_slots, acc.stride(0), out.stride(0),
        GATED=gates is not None, HAS_BIAS=bias is not None, SCRATCH=scratch,
        COMBINE=layout.combine, **common)
    if fixed is not None:
        tiles = cfg.fixed_finish.tiles
        grid = (triton.cdiv(n_tokens, tiles["BLOCK_T"]), triton.cdiv(width, tiles["BLOCK_N"]))
        run(_fixed_finish_kernel, grid, cfg.fixed_finish, acc, row_stat,
            bias if bias is not None else out, out, n_tokens, width, acc.stride(0),
            out.stride(0), HAS_BIAS=bias is not None)
    elif layout.combine == "atomic" and scratch:
        out.copy_(acc)


def _config(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: torch.dtype,
    deterministic: bool, arch: str | None, seconds=None,
) -> MixtureConfig:
    """The decode's config on ``arch`` (default: the weights' device); with autotuning on, the
    tuned one for its key, timing the candidates with ``seconds(cfg)`` on a miss (the forward
    passes a timer; the backward, called after it, finds the key cached)."""
    cfg = plan(n_tokens, n_slots, U, V, dtype, default_combine(dtype, deterministic), arch)
    if not autotune_enabled():
        return cfg
    ranks = [v.shape[1] for v in V]
    key = tuning_key(arch or arch_of(V[0].device), dtype, ranks, n_tokens, n_slots,
                     sum(v.shape[0] for v in V), V[0].shape[2], U[0].shape[1])
    timer = None if seconds is None else (lambda tuning: seconds(apply_tuning(cfg, tuning)))
    return apply_tuning(cfg, autotune(key, tuning_candidates(cfg), timer))


def _step_seconds(
    cfg: MixtureConfig, x: Tensor, gates: Tensor, indices: Tensor, U: Sequence[Tensor],
    V: Sequence[Tensor], b_dec: Tensor, allow_tf32: bool, deterministic: bool,
) -> float:
    """The autotuner's timer: seconds of the forward and backward kernels with ``cfg`` on these
    inputs (CUDA: do_bench's median, warm-up and L2 flush included; elsewhere one timed run)."""

    def step() -> None:
        y, table, h_pre = forward(x, gates, indices, U, V, b_dec, allow_tf32,
                                  deterministic=deterministic, cfg=cfg)
        backward(y, x, gates, table, U, V, h_pre, (True,) * 4, allow_tf32,
                 deterministic=deterministic, cfg=cfg)

    if x.device.type == "cuda":
        return triton.testing.do_bench(step, return_mode="median") / 1e3
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def forward(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
    allow_tf32: bool = False,
    run: Runner = launch_kernel,
    deterministic: bool = True,
    arch: str | None = None,
    cfg: MixtureConfig | None = None,
) -> tuple[Tensor, BlockTable, Tensor]:
    """y [N, d_out], the block table and h_pre [layout.h_size] (x's dtype, fully written).
    ``deterministic=False`` opts into the atomic combine (see ``_expand``): faster by the cost
    model, but y's rounding varies from run to run.

    x [N, d_in]; gates [N, S] fp32 (fp64 for fp64 x); indices [N, S] int64; U[b] [n_b, d_out, r_b];
    V[b] [n_b, r_b, d_in] (x's dtype, or fp32 under half x: cast per tile); b_dec [d_out] (any
    float dtype: read in the accumulation dtype). ``allow_tf32``: fp32 dots in TF32. ``arch``
    picks the config family (default: x's device); ``cfg`` overrides the config.
    """
    n_tokens, n_slots = indices.shape
    if cfg is None:
        timer = None
        if run is launch_kernel:
            timer = functools.partial(_step_seconds, x=x, gates=gates, indices=indices, U=U,
                                      V=V, b_dec=b_dec, allow_tf32=allow_tf32,
                                      deterministic=deterministic)
        cfg = _config(n_tokens, n_slots, U, V, x.dtype, deterministic, arch, timer)
    layout = cfg.layout
    ranks, counts = tuple(v.shape[1] for v in V), tuple(v.shape[0] for v in V)
    binfo, rank_of_t, _ = _bucket_tables(ranks, counts, cfg.grad_u.tiles["BLOCK_Q"], x.device)
    x, gates, indices = x.contiguous(), gates.contiguous(), indices.contiguous()
    table = route(indices, gates, rank_of_t, layout)
    common = dict(N_BUCKETS=len(V), ACC=_acc(x.dtype), DOT_FP32=_dot_fp32(x.dtype),
                  PRECISION=dot_precision(x.dtype, allow_tf32))
    h_pre = _empty((layout.h_size,), x.dtype, x.device)
    fixed = _fixed_combine(U, n_tokens, binfo, rank_of_t.shape[0], False, cfg, run)
    run(_shrink_kernel, (layout.n_blocks + 1,), cfg.shrink_fwd,
        x, *_weight_args(V), h_pre, h_pre, gates, gates, table.block_order, table.block_t,
        table.block_h, table.pair_of_row, binfo, table.blocks_used,
        *_bound_args(fixed, gates), x.shape[1], n_slots,
        layout.n_blocks, layout.h_size, x.stride(0), n_tokens, BACKWARD=False,
        BOUND=fixed is not None, **common)
    y = _empty((n_tokens, U[0].shape[1]), x.dtype, x.device)
    _expand(h_pre, U, y, b_dec.contiguous(), gates, table, binfo, cfg.expand_fwd, cfg,
            n_slots, common, run, fixed)
    return y, table, h_pre


class XtySplit(NamedTuple):
    """How one backward's X^T Y programs split hot transforms (kernels._xty_plan_kernel).

    plan: int64 [2 (T + 1) + max_hot], None when no transform can split (then every transform is
    one program per rank tile, as binfo lays them out); part: the chunk partials, accumulator
    dtype, at most XTY_PARTIAL_ELEMENTS; n_work: X^T Y programs along axis 0 (shape-only bound);
    max_hot: transforms that can split (the reduction's programs).
    """

    plan: Tensor | None
    part: Tensor | None
    n_work: int
    max_hot: int


def _plan_xty_split(
    table: BlockTable, rank_of_t: Tensor, ranks: Sequence[int], n_items: int,
    cfg: MixtureConfig, width: int, acc_dtype: torch.dtype, run: Runner,
) -> XtySplit:
    """Launch the plan (no host sync: every size is a bound from shapes) for X^T Y outputs up to
    ``width`` = max(d_in, d_out) wide; dU and dV share it and its partial buffer."""
    n_transforms, layout = rank_of_t.shape[0], cfg.layout
    chunk = cfg.xty_chunk_blocks
    budget_rows = cfg.xty_partial_rows
    # A split transform has > chunk blocks and takes >= 2 r_min partial rank rows.
    max_hot = min(n_transforms, layout.n_blocks // (chunk + 1), budget_rows // (2 * min(ranks)))
    if max_hot <= 0:
        return XtySplit(None, None, n_items, 0)
    block_q = cfg.grad_u.tiles["BLOCK_Q"]
    # Extra programs: sum over split t of (chunks_t - 1) x rank tiles_t, chunks_t - 1 <= B_t / chunk
    # and sum of chunks_t x r_t <= budget_rows.
    extra = min(layout.n_blocks // chunk, budget_rows // min(ranks)) * triton.cdiv(max(ranks),
                                                                                 block_q)
    device = rank_of_t.device
    plan = torch.empty(2 * (n_transforms + 1) + max_hot, dtype=torch.int64, device=device)
    run(_xty_plan_kernel, (1,), cfg.xty_plan, table.t_block_start, rank_of_t, plan,
        n_transforms, chunk, budget_rows, max_hot, BLOCK_Q=block_q)
    part_rows = min(budget_rows, (layout.n_blocks // chunk + max_hot) * max(ranks))
    part = _empty((part_rows * width,), acc_dtype, device)
    return XtySplit(plan, part, n_items + extra, max_hot)


def _xty(
    x: Tensor, h: Tensor, gates: Tensor | None, out: Tensor, transposed: bool, table: BlockTable,
    binfo: Tensor, split: XtySplit, cfg_launch, cfg: MixtureConfig, n_slots: int, common: dict,
    run: Runner,
) -> None:
    """out (flat, every bucket) = per transform t: X[token(rows)]^T (g) H[rows] over t's rows;
    split transforms by chunks, then summed in chunk order."""
    P = x.shape[1]
    n_transforms = table.t_block_start.shape[0] - 1
    grid = (split.n_work, triton.cdiv(P, cfg_launch.tiles["BLOCK_P"]))
    plan = split.plan if split.plan is not None else table.t_block_start  # never read unsplit
    part = split.part if split.part is not None else out
    run(_xty_kernel, grid, cfg_launch,
        x, h, out, part, gates if gates is not None else out, table.t_block_start,
        table.block_h, table.pair_of_row, binfo, plan, P, n_slots, x.stride(0), n_transforms,
        GATED=gates is not None, TRANSPOSED=transposed, SPLIT=split.plan is not None, **common)
    if split.plan is not None:
        run(_xty_reduce_kernel, (split.max_hot, XTY_REDUCE_PROGRAMS), cfg.xty_reduce,
            part, out, binfo, plan, P, n_transforms, BLOCK_Q=cfg_launch.tiles["BLOCK_Q"],
            N_BUCKETS=common["N_BUCKETS"])


def backward(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    table: BlockTable,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    h_pre: Tensor,
    needs: tuple[bool, bool, bool, bool],
    allow_tf32: bool = False,
    run: Runner = launch_kernel,
    deterministic: bool = True,
    arch: str | None = None,
    cfg: MixtureConfig | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx [N, d_in], dgates [N, S], dU flat, dV flat) for ``needs`` = (x, gates, U, V); the flat
    gradients hold every bucket's [n_b, d_out, r_b] / [n_b, r_b, d_in] one after the other
    (the op's autograd views them). Inputs as returned by / passed to :func:`forward`, with
    the same ``arch`` and ``cfg``; ``deterministic=False``: dx by the atomic combine (as in
    :func:`forward`).
    """
    need_x, need_g, need_u, need_v = needs
    n_tokens, n_slots = gates.shape
    if cfg is None:
        cfg = _config(n_tokens, n_slots, U, V, x.dtype, deterministic, arch)
    layout = cfg.layout
    ranks, counts = tuple(v.shape[1] for v in V), tuple(v.shape[0] for v in V)
    binfo, rank_of_t, n_items = _bucket_tables(ranks, counts, cfg.grad_u.tiles["BLOCK_Q"],
                                               x.device)
    x, gates, grad_y = x.contiguous(), gates.contiguous(), grad_y.contiguous()
    common = dict(N_BUCKETS=len(V), ACC=_acc(x.dtype), DOT_FP32=_dot_fp32(x.dtype),
                  PRECISION=dot_precision(x.dtype, allow_tf32))
    # Dropped pairs get no program: their gradient is the zero they start from.
    dgates = torch.zeros(n_tokens, n_slots, dtype=gates.dtype, device=x.device)
    dx = dU = dV = None
    if need_u or need_v:
        split = _plan_xty_split(table, rank_of_t, ranks, n_items, cfg,
                                max(x.shape[1], grad_y.shape[1]), accumulator_dtype(x.dtype), run)
    if need_u:
        dU = _empty((sum(u.numel() for u in U),), U[0].dtype, x.device)
        _xty(grad_y, h_pre, gates, dU, False, table, binfo, split, cfg.grad_u, cfg, n_slots,
             common, run)
    if need_g or need_x or need_v:
        dh = _empty((layout.h_size,), x.dtype, x.device)
        fixed = None
        if need_x:
            fixed = _fixed_combine(V, n_tokens, binfo, rank_of_t.shape[0], True, cfg, run)
        run(_shrink_kernel, (layout.n_blocks + 1,), cfg.shrink_bwd,
            grad_y, *_weight_args(U), h_pre, dh, gates, dgates, table.block_order, table.block_t,
            table.block_h, table.pair_of_row, binfo, table.blocks_used,
            *_bound_args(fixed, gates), grad_y.shape[1], n_slots,
            layout.n_blocks, layout.h_size, grad_y.stride(0), n_tokens, BACKWARD=True,
            BOUND=fixed is not None, **common)
        if need_x:
            dx = _empty(tuple(x.shape), x.dtype, x.device)
            _expand(dh, V, dx, None, None, table, binfo, cfg.expand_bwd, cfg, n_slots,
                    common, run, fixed)
        if need_v:
            dV = _empty((sum(v.numel() for v in V),), V[0].dtype, x.device)
            _xty(x, dh, None, dV, True, table, binfo, split, cfg.grad_v, cfg, n_slots, common,
                 run)
    return dx, dgates if need_g else None, dU, dV
