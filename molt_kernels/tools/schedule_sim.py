"""L2 simulation of the decode's kernels over the block table routing builds (every figure MODELED).

The cost model (``cost_model.py``) asks here for each grouped kernel's HBM and L2 bytes instead of
assuming which reads hit L2. For one routing (uniform or Zipf, built by ``launch.route`` on the
CPU) it lays out the programs of a kernel in launch order (grid axis 0 fastest, as the hardware
dispatches), gives each program the accesses its code makes at tile granularity, schedules the
programs on ``slots = SMs x PROGRAMS_PER_SM`` (list scheduling, each program as long as its FLOPs),
orders all accesses by the resulting time and runs an L2 over that stream.

Assumptions (stated, not measured):
- Objects, not lines: an activation row (or its width-tile slice), a weight tile, a block's
  rank-space tile, an accumulator row slice. A hit needs the whole object.
- The L2 is LRU with an effective capacity of ``L2_EFFECTIVE`` of the datasheet size (H100 and
  A100 split the L2 into two partitions; replacement is not LRU). Reuse is judged by *reuse time*:
  an access hits when at most that many bytes were accessed since the object's last access. That
  counts repeated bytes again, so it finds fewer hits than an LRU stack distance would:
  conservative.
- HBM bytes: a read miss fetches its object; an object written while resident is written back once
  per residency (also when the kernel ends: nothing stays dirty for free). Every kernel starts with
  a cold L2. An fp32 atomic add is a read-modify-write in L2.
- L2 bytes: every access's size reaches L2 (L1 is not credited: gathered rows change per block),
  a read-modify-write twice.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..ops.configs import MixtureConfig
from ..ops.lowrank_mixture.launch import BlockTable, route

# Programs resident per SM (the decode's kernels use 4-8 warps and up to ~128 KiB of shared memory).
PROGRAMS_PER_SM = 2
# Usable fraction of the datasheet L2 (two partitions, non-LRU replacement).
L2_EFFECTIVE = 0.5
# Fixed cost of a step (a block's visit) in FLOP units for the scheduling, so steps without FLOPs
# (the combine's init and cast-out) still take time.
STEP_OVERHEAD_FLOPS = 1 << 16

# Access kinds (bit 1: reads the object, bit 2: writes it); RED: an fp32 atomic add, a
# read-modify-write done in L2 (its data crosses to L2 once).
READ, WRITE, RMW, RED = 1, 2, 3, 7


@dataclass(frozen=True)
class Traffic:
    """Simulated bytes of one kernel: total accessed at L2 and moved to/from HBM (one value per
    L2 capacity asked for), programs and the schedule's imbalance (makespan over the ideal
    total work / slots, >= 1: fewer programs than slots or a long program's tail)."""

    l2_bytes: float
    hbm_bytes: tuple[float, ...]
    programs: int
    imbalance: float


class _Stream:
    """Accesses of one kernel: each belongs to a step; steps belong to programs (launch order)."""

    def __init__(self) -> None:
        self.step_program: list[np.ndarray] = []
        self.step_cost: list[np.ndarray] = []
        self.acc: list[tuple[np.ndarray, ...]] = []
        self.n_steps = 0

    def steps(self, program: np.ndarray, cost: np.ndarray) -> np.ndarray:
        """Register steps (program id, cost each); returns their ids."""
        ids = self.n_steps + np.arange(len(program))
        self.step_program.append(np.asarray(program, np.int64))
        cost = np.broadcast_to(np.asarray(cost, np.float64), np.shape(program))
        self.step_cost.append(cost + STEP_OVERHEAD_FLOPS)
        self.n_steps += len(program)
        return ids

    def access(self, step: np.ndarray, obj: np.ndarray, size, kind: int) -> None:
        step = np.asarray(step, np.int64)
        size = np.broadcast_to(np.asarray(size, np.float64), step.shape)
        self.acc.append(
            (
                step.astype(np.int32),
                np.asarray(obj, np.int64),
                size.astype(np.float32),
                np.full(step.shape, kind, np.int8),
            )
        )

    def simulate(self, slots: int, capacities: tuple[float, ...]) -> Traffic:
        prog = np.concatenate(self.step_program)
        cost = np.concatenate(self.step_cost)
        # Steps of a program run in registration order; programs start on the first free slot.
        order = np.argsort(prog, kind="stable")
        n_prog = int(prog.max()) + 1
        duration = np.bincount(prog, weights=cost, minlength=n_prog)
        start = _list_schedule(duration, slots)
        imbalance = float((start + duration).max() / (duration.sum() / slots))
        cum = np.cumsum(cost[order]) - cost[order]
        first = np.searchsorted(prog[order], np.arange(n_prog))
        step_time = np.empty_like(cost)
        step_time[order] = start[prog[order]] + cum - cum[first[prog[order]]]
        step, obj, size, kind = (np.concatenate(c) for c in zip(*self.acc))
        hbm, l2 = _l2(step_time[step], obj, size, kind, capacities)
        return Traffic(l2, hbm, n_prog, max(1.0, imbalance))


def _list_schedule(duration: np.ndarray, slots: int) -> np.ndarray:
    """Start time of each program, dispatched in order onto the first slot to free up."""
    start = np.zeros(len(duration))
    free = [0.0] * min(slots, len(duration))
    heapq.heapify(free)
    for p, d in enumerate(duration):
        t = heapq.heappop(free)
        start[p] = t
        heapq.heappush(free, t + d)
    return start


def _l2(time, obj, size, kind, capacities: tuple[float, ...]) -> tuple[tuple[float, ...], float]:
    """(HBM bytes per capacity, L2 bytes): reuse-time LRU over the accesses ordered by time
    (ties in registration order)."""
    order = np.argsort(time, kind="stable")
    obj, size, kind = obj[order], size[order].astype(np.float64), kind[order]
    del order, time
    before = np.cumsum(size) - size  # bytes accessed before each access
    by_obj = np.argsort(obj, kind="stable")
    o = obj[by_obj]
    first = np.ones(len(o), bool)
    first[1:] = o[1:] != o[:-1]
    prev_end = np.empty(len(o))
    prev_end[1:] = before[by_obj[:-1]] + size[by_obj[:-1]]
    gap = before[by_obj] - np.where(first, 0, prev_end)
    del prev_end
    k = kind[by_obj]
    s = size[by_obj]
    reads, writes = (k & READ) != 0, (k & WRITE) != 0
    hbm = []
    for capacity in capacities:
        miss = first | (gap > capacity)
        residency = np.cumsum(miss) - 1
        dirty = np.zeros(int(residency[-1]) + 1 if len(o) else 0, bool)
        dirty[residency[writes]] = True
        hbm.append(float(np.sum(s[miss & reads])) + float(np.sum(s[miss][dirty])))
    l2 = float(np.sum(size * np.where(kind == RMW, 2, 1)))  # RED crosses once
    return tuple(hbm), l2


def _ids(namespace: int, *index: np.ndarray, dims: tuple[int, ...] = ()) -> np.ndarray:
    """Unique object ids: namespace in the top bits, a mixed-radix index below."""
    flat = np.asarray(index[0], np.int64)
    for i, d in zip(index[1:], dims, strict=True):
        flat = flat * d + i
    return (np.int64(namespace) << np.int64(48)) + flat


@dataclass
class Routing:
    """The block table as numpy arrays plus what the simulation needs per block."""

    table: BlockTable
    block_t: np.ndarray  # [blocks used]
    rows_token: np.ndarray  # [blocks used, BLOCK_M], -1 on padding rows
    rank: np.ndarray  # [blocks used]
    block_range: np.ndarray  # [blocks used]
    n_tokens: int
    order: np.ndarray  # used blocks in the shrink's launch order


def build_routing(
    indices: torch.Tensor,
    gates: torch.Tensor,
    rank_of_t: torch.Tensor,
    cfg: MixtureConfig,
    windowed: bool,
) -> Routing:
    """Route like the decode does and keep the used blocks; ``windowed``: the shrink runs the
    table's L2-window order (else plain table order, the schedule before windows)."""
    lay = cfg.layout
    table = route(indices, gates, rank_of_t, lay)
    used = int(table.blocks_used.item())
    n_slots = indices.shape[1]
    pairs = table.pair_of_row.numpy().reshape(lay.n_blocks, lay.block_m)[:used]
    rows_token = np.where(pairs >= 0, pairs // n_slots, -1)
    block_t = table.block_t.numpy()[:used]
    first_token = np.where(rows_token >= 0, rows_token, np.iinfo(np.int64).max).min(1)
    block_range = first_token // lay.range_tokens
    order = table.block_order.numpy()[:used] if windowed else np.arange(used)
    return Routing(
        table, block_t, rows_token, rank_of_t.numpy()[block_t], block_range, indices.shape[0], order
    )


def _row_accesses(
    stream: _Stream,
    step: np.ndarray,
    tokens: np.ndarray,
    namespace: int,
    size: float,
    kind: int,
    width_tile: np.ndarray | None = None,
    n_tiles: int = 1,
) -> None:
    """One access per routed row of each step's block: tokens [steps, BLOCK_M] (-1: padding)."""
    ok = tokens >= 0
    s = np.broadcast_to(step[:, None], tokens.shape)[ok]
    tok = tokens[ok]
    if width_tile is None:
        obj = _ids(namespace, tok)
    else:
        obj = _ids(
            namespace, tok, np.broadcast_to(width_tile[:, None], tokens.shape)[ok], dims=(n_tiles,)
        )
    stream.access(s, obj, size, kind)


def shrink_traffic(
    r: Routing,
    width: int,
    cfg_tiles: dict,
    elem: int,
    backward: bool,
    slots: int,
    capacities: tuple[float, ...],
) -> Traffic:
    """Shrink: a program per block (launch order ``r.order``), per rank tile: the rows'
    activation (``width`` wide), the weight tile, the h tile written (backward: h_pre read too)."""
    m, br = cfg_tiles["BLOCK_M"], cfg_tiles["BLOCK_R"]
    stream = _Stream()
    blocks = r.order
    tiles = -(-r.rank[blocks] // br)
    prog = np.repeat(np.arange(len(blocks)), tiles)
    blk = np.repeat(blocks, tiles)
    j = np.arange(len(prog)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    tile_r = np.minimum(br, r.rank[blk] - j * br)
    step = stream.steps(prog, 2.0 * m * br * width)
    _row_accesses(stream, step, r.rows_token[blk], 1, width * elem, READ)
    stream.access(step, _ids(2, r.block_t[blk], j, dims=(64,)), tile_r * width * elem, READ)
    stream.access(step, _ids(3, blk, j, dims=(64,)), m * tile_r * elem, WRITE)
    if backward:
        stream.access(step, _ids(4, blk, j, dims=(64,)), m * tile_r * elem, READ)
    return stream.simulate(slots, capacities)


def expand_traffic(
    r: Routing,
    width: int,
    cfg_tiles: dict,
    elem: int,
    atomic: bool,
    slots: int,
    capacities: tuple[float, ...],
    width_fastest: bool = False,
) -> Traffic:
    """Combine. Deterministic: a program per (token range, width tile), range fastest; it writes
    its range's accumulator slice, walks the range's blocks (h tile, weight tile, read-modify-
    write of the rows' fp32 slices) and casts the slice out. Atomic: a program per (block in
    window order, width tile), block fastest; the rows' slices are atomic adds; the bias fill
    before and the cast after stream [tokens, width] once each."""
    m, bn = cfg_tiles["BLOCK_M"], cfg_tiles["BLOCK_N"]
    n_tiles = -(-width // bn)
    stream = _Stream()
    flops = 2.0 * m * r.rank * bn
    if atomic:
        blocks = r.order
        nb = len(blocks)
        if width_fastest:
            wt, blk = np.tile(np.arange(n_tiles), nb), np.repeat(blocks, n_tiles)
        else:
            wt, blk = np.repeat(np.arange(n_tiles), nb), np.tile(blocks, n_tiles)
        step = stream.steps(np.arange(nb * n_tiles), flops[blk])
        stream.access(step, _ids(1, blk), m * r.rank[blk] * elem, READ)
        stream.access(
            step, _ids(2, r.block_t[blk], wt, dims=(n_tiles,)), r.rank[blk] * bn * elem, READ
        )
        _row_accesses(stream, step, r.rows_token[blk], 3, bn * 4, RED, wt, n_tiles)
        traffic = stream.simulate(slots, capacities)
        fill_and_cast = r.n_tokens * width * (4 + 4 + elem)
        return Traffic(
            traffic.l2_bytes + fill_and_cast,
            tuple(h + fill_and_cast for h in traffic.hbm_bytes),
            traffic.programs,
            traffic.imbalance,
        )
    n_ranges = int(r.table.range_start.shape[0] - 1)
    range_tokens = -(-r.n_tokens // n_ranges)
    # Blocks of each range in table order (the kernel walks range_blocks).
    by_range = np.argsort(r.block_range, kind="stable")
    tok = np.arange(r.n_tokens)
    # Program id = range + n_ranges * width tile. Steps: init, blocks..., cast-out.
    prog_of = np.arange(n_ranges)[None, :] + n_ranges * np.arange(n_tiles)[:, None]
    init = stream.steps(prog_of.reshape(-1), np.zeros(n_ranges * n_tiles))
    tok_range = tok // range_tokens
    tok_steps = init.reshape(n_tiles, n_ranges)[:, tok_range]  # [tiles, tokens]
    wt_tok = np.broadcast_to(np.arange(n_tiles)[:, None], tok_steps.shape)
    stream.access(
        tok_steps.reshape(-1),
        _ids(3, np.broadcast_to(tok, tok_steps.shape), wt_tok, dims=(n_tiles,)).reshape(-1),
        bn * 4,
        WRITE,
    )
    blk = np.tile(by_range, n_tiles)
    wt = np.repeat(np.arange(n_tiles), len(by_range))
    step = stream.steps(r.block_range[blk] + n_ranges * wt, flops[blk])
    stream.access(step, _ids(1, blk), m * r.rank[blk] * elem, READ)
    stream.access(step, _ids(2, r.block_t[blk], wt, dims=(n_tiles,)), r.rank[blk] * bn * elem, READ)
    _row_accesses(stream, step, r.rows_token[blk], 3, bn * 4, RMW, wt, n_tiles)
    cast = stream.steps(prog_of.reshape(-1), np.zeros(n_ranges * n_tiles))
    cast_steps = cast.reshape(n_tiles, n_ranges)[:, tok_range].reshape(-1)
    objs = _ids(3, np.broadcast_to(tok, tok_steps.shape), wt_tok, dims=(n_tiles,)).reshape(-1)
    stream.access(cast_steps, objs, bn * 4, READ)
    stream.access(cast_steps, objs + (np.int64(2) << np.int64(48)), bn * elem, WRITE)
    return stream.simulate(slots, capacities)


def xty_traffic(
    r: Routing, width: int, cfg_tiles: dict, elem: int, slots: int, capacities: tuple[float, ...]
) -> Traffic:
    """X^T Y: a program per ((transform, rank tile) item, width tile), item fastest; it walks the
    transform's blocks: the rows' activation slices and the block's h tile; writes its output."""
    bp, bq = cfg_tiles["BLOCK_P"], cfg_tiles["BLOCK_Q"]
    m = cfg_tiles["BLOCK_M"]
    n_tiles = -(-width // bp)
    stream = _Stream()
    # Items in order of (transform, rank tile); a transform's blocks are consecutive in the table.
    t_ids = np.unique(r.block_t)
    rank_t = np.zeros(int(t_ids.max()) + 1 if len(t_ids) else 0, np.int64)
    rank_t[r.block_t] = r.rank
    q_tiles = -(-rank_t // bq)
    # Every transform has items (empty ones write their zero); only routed ones read anything.
    n_items = int(q_tiles.sum())
    item_t = np.repeat(np.arange(len(rank_t)), q_tiles)
    item_q = np.arange(n_items) - np.repeat(np.cumsum(q_tiles) - q_tiles, q_tiles)
    t_first = np.searchsorted(r.block_t, np.arange(len(rank_t)))
    t_count = np.bincount(r.block_t, minlength=len(rank_t))
    # Steps: (width tile, item, block of t).
    per_item = t_count[item_t]
    item_blk = np.repeat(t_first[item_t], per_item) + (
        np.arange(per_item.sum()) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    )
    item_of = np.repeat(np.arange(n_items), per_item)
    blk = np.tile(item_blk, n_tiles)
    it = np.tile(item_of, n_tiles)
    wt = np.repeat(np.arange(n_tiles), len(item_blk))
    tile_q = np.minimum(bq, rank_t[item_t[it]] - item_q[it] * bq)
    step = stream.steps(it + n_items * wt, 2.0 * m * bp * tile_q)
    _row_accesses(stream, step, r.rows_token[blk], 1, bp * elem, READ, wt, n_tiles)
    stream.access(step, _ids(2, blk, item_q[it], dims=(64,)), m * tile_q * elem, READ)
    done = stream.steps(np.arange(n_items * n_tiles), np.zeros(n_items * n_tiles))
    stream.access(
        done,
        _ids(3, np.arange(n_items * n_tiles)),
        bp * np.tile(np.minimum(bq, rank_t[item_t] - item_q * bq), n_tiles) * elem,
        WRITE,
    )
    return stream.simulate(slots, capacities)
