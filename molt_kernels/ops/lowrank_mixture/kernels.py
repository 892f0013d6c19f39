"""Triton kernels of the MOLT decode: one grouped launch per phase over a block table.

Routing (``launch.route``) sorts the kept (token, slot) pairs by segment = (transform, token
range) and pads each segment to BLOCK_M rows: a block belongs to one transform and one token
range. Per block the table holds its transform (``block_t``, -1 past the used blocks) and the
offset of its rows in the flat rank-space buffers (``block_h``; a row of transform t holds r_t
values, so the buffers are sized by the active pairs times the rank, never by bucket capacity).
All buckets run in the same launch: a program looks its transform's bucket up in ``binfo``
(rows (first transform, rank, first X^T Y item, rank rows before the bucket)), picks that
bucket's weight tensor and loops over the rank as a runtime bound in BLOCK_R / BLOCK_K steps.

Kernels (grid; what a program reads -> writes):

- ``_shrink_kernel`` (blocks + 1, in L2-window order ``block_order``: a window's tokens' rows stay
  in L2 while its blocks run transform by transform): H = A[token(rows)] @ W_t^T for all r_t
  columns. Forward: A = x, W = V -> h_pre. Backward: A = dY, W = U^T -> g dH and
  dgate = rowsum(dH * h_pre). Programs without a block zero the unused tail of h_pre, so the
  op's outputs are fully defined.
- ``_expand_kernel`` (token ranges, width tiles): a program owns its token range's rows of the
  output tile and walks that range's blocks in table order: out[token(rows)] += (g) H @ W_t.
  One writer per output element and a fixed order, so the combine is deterministic without
  atomics and without a [pairs, width] slot buffer. Forward: H = h_pre gated, W = U^T -> y
  (+ b_dec); backward: H = g dH, W = V -> dx. Half outputs accumulate in an fp32 [tokens, width]
  scratch that the program casts out at the end. ``ATOMIC`` (opt-in, nondeterministic): instead a
  program per (block in window order, width tile) adds its rows into the scratch (holding the
  bias) with fp32 atomics; no token ranges to own, so blocks are longer and no program waits on
  its range's other blocks.
- ``_xty_kernel`` ((transform, rank tile) items, width tiles): C_t = X[token(rows)]^T (g) H[rows]
  over t's blocks in order, into the flat gradient of all buckets: dU_t = dY^T (g h_pre),
  dV_t^T = x^T (g dH). Empty transforms write their zero. Under skewed routing a transform's rows
  split into chunks (``_xty_plan_kernel``, one program, builds the work items on the device): a
  split transform's chunk programs write fp32 partials that ``_xty_reduce_kernel`` (split
  transforms, programs per transform) sums in chunk order, so the result stays deterministic.

Precision: bf16/fp16 run on tensor cores with fp32 accumulation; fp32 uses ``ieee`` dots (tf32
when opted into), fp64 runs in fp64. Weights in another float dtype than the activations (fp32
master weights) are cast per tile in registers. Under the interpreter bf16 dots widen their
operands to fp32 first (``DOT_FP32``): triton 3.9's interpreter multiplies bf16 bit patterns.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of a binfo row.
INFO_COLUMNS = 4
INFO = tl.constexpr(INFO_COLUMNS)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _bucket(t_or_item, binfo_ptr, COLUMN: tl.constexpr, N_BUCKETS: tl.constexpr):
    """The bucket whose first transform (COLUMN 0) or first item (COLUMN 2) is <= t_or_item."""
    b = 0
    for i in tl.static_range(1, N_BUCKETS):
        b = tl.where(t_or_item >= tl.load(binfo_ptr + i * INFO + COLUMN), i, b)
    return b


@triton.jit
def _weights(b, w0, w1, w2, w3, w4, w5, w6, w7, N_BUCKETS: tl.constexpr):
    """Base pointer of bucket b's weight tensor (one argument per bucket, up to 8)."""
    w = w0
    if N_BUCKETS > 1:
        if b == 1:
            w = w1
    if N_BUCKETS > 2:
        if b == 2:
            w = w2
    if N_BUCKETS > 3:
        if b == 3:
            w = w3
    if N_BUCKETS > 4:
        if b == 4:
            w = w4
    if N_BUCKETS > 5:
        if b == 5:
            w = w5
    if N_BUCKETS > 6:
        if b == 6:
            w = w6
    if N_BUCKETS > 7:
        if b == 7:
            w = w7
    return w


@triton.jit
def _shrink_kernel(
    a_ptr, w0, w1, w2, w3, w4, w5, w6, w7, h_ptr, dh_ptr, gate_ptr, dgate_ptr,
    block_order_ptr, block_t_ptr, block_h_ptr, row_pair_ptr, binfo_ptr, blocks_used_ptr,
    K, n_slots, n_blocks, h_size, stride_am,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, BACKWARD: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # Used blocks run in window order; the unused ones (and the extra program) keep their id.
    block = tl.load(block_order_ptr + tl.program_id(0), mask=tl.program_id(0) < n_blocks,
                    other=n_blocks)
    t = tl.load(block_t_ptr + block, mask=block < n_blocks, other=-1)
    if t < 0:
        if not BACKWARD:
            # Unused programs (at least one: the grid has one extra) zero h_pre's tail.
            used = tl.load(blocks_used_ptr)
            start = tl.load(block_h_ptr + used)
            share = tl.cdiv(h_size - start, n_blocks + 1 - used)
            lo = start + (block - used).to(tl.int64) * share
            hi = tl.minimum(lo + share, h_size)
            for i in range(lo, hi, BLOCK_M * BLOCK_R):
                offs = i + tl.arange(0, BLOCK_M * BLOCK_R)
                tl.store(h_ptr + offs, tl.zeros((BLOCK_M * BLOCK_R,), h_ptr.dtype.element_ty),
                         mask=offs < hi)
        return
    b = _bucket(t, binfo_ptr, 0, N_BUCKETS)
    rank = tl.load(binfo_ptr + b * INFO + 1)
    w_t = _weights(b, w0, w1, w2, w3, w4, w5, w6, w7, N_BUCKETS)
    w_t += (t - tl.load(binfo_ptr + b * INFO)) * rank * K
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair >= 0
    a_rows = a_ptr + tl.where(valid, pair // n_slots, 0)[:, None] * stride_am
    h_rows = tl.load(block_h_ptr + block) + tl.arange(0, BLOCK_M).to(tl.int64)[:, None] * rank
    offs_k = tl.arange(0, BLOCK_K)
    if BACKWARD:
        gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
        dgate = tl.zeros((BLOCK_M,), ACC)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r[None, :] < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
            # Forward W_t = V_t [r, K] (rank-major); backward W_t = U_t [K, r].
            if BACKWARD:
                w_tile = w_t + kk[:, None] * rank + offs_r[None, :]
            else:
                w_tile = w_t + offs_r[None, :] * K + kk[:, None]
            w = tl.load(w_tile, mask=r_ok & (kk[:, None] < K), other=0.0)
            acc = _dot(a, w.to(a.dtype), acc, DOT_FP32, PRECISION)
        h_tile = h_rows + offs_r[None, :]
        if BACKWARD:
            h_pre = tl.load(h_ptr + h_tile, mask=r_ok, other=0.0).to(ACC)
            dgate += tl.sum(acc * h_pre, axis=1)
            tl.store(dh_ptr + h_tile, (acc * gate[:, None]).to(dh_ptr.dtype.element_ty),
                     mask=r_ok)
        else:
            tl.store(h_ptr + h_tile, acc.to(h_ptr.dtype.element_ty), mask=r_ok)
    if BACKWARD:
        tl.store(dgate_ptr + pair, dgate.to(dgate_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _expand_block(
    block, h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, gate_ptr, block_t_ptr, block_h_ptr,
    row_pair_ptr, binfo_ptr, offs_n, n_ok, N, n_slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, GATED: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(g) H @ W_t of one block for the columns offs_n: ([BLOCK_M, BLOCK_N] ACC, token of each
    row, row is routed)."""
    t = tl.load(block_t_ptr + block)
    b = _bucket(t, binfo_ptr, 0, N_BUCKETS)
    rank = tl.load(binfo_ptr + b * INFO + 1)
    w_t = _weights(b, w0, w1, w2, w3, w4, w5, w6, w7, N_BUCKETS)
    w_t += (t - tl.load(binfo_ptr + b * INFO)) * rank * N
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair >= 0
    h_rows = tl.load(block_h_ptr + block) + tl.arange(0, BLOCK_M).to(tl.int64)[:, None] * rank
    if GATED:
        gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for r0 in range(0, rank, BLOCK_K):
        kk = r0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + h_rows + kk[None, :], mask=kk[None, :] < rank, other=0.0)
        if GATED:
            # The gate scales r values per row here, not N values after the matmul.
            h = (h.to(ACC) * gate[:, None]).to(h_ptr.dtype.element_ty)
        # Forward W_t = U_t [N, r]; backward W_t = V_t [r, N] (rank-major).
        if GATED:
            w_tile = w_t + offs_n[None, :] * rank + kk[:, None]
        else:
            w_tile = w_t + kk[:, None] * N + offs_n[None, :]
        w = tl.load(w_tile, mask=(kk[:, None] < rank) & n_ok, other=0.0)
        acc = _dot(h, w.to(h.dtype), acc, DOT_FP32, PRECISION)
    return acc, tl.where(valid, pair // n_slots, 0), valid


@triton.jit
def _expand_kernel(
    h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, acc_ptr, out_ptr, bias_ptr, gate_ptr,
    range_blocks_ptr, range_start_ptr, block_order_ptr, block_t_ptr, block_h_ptr, row_pair_ptr,
    binfo_ptr, N, n_tokens, range_tokens, n_slots, stride_acc, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCRATCH: tl.constexpr, ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n[None, :] < N
    if ATOMIC:
        # Opt-in, nondeterministic: a program per (block in window order, width tile) adds its
        # rows into acc (already holding the bias or zero) with fp32 atomics; the order of
        # the adds, hence the rounding, varies from run to run.
        block = tl.load(block_order_ptr + tl.program_id(0))
        if tl.load(block_t_ptr + block) >= 0:
            acc, tok, valid = _expand_block(
                block, h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, gate_ptr, block_t_ptr,
                block_h_ptr, row_pair_ptr, binfo_ptr, offs_n, n_ok, N, n_slots,
                BLOCK_M, BLOCK_N, BLOCK_K, N_BUCKETS, GATED, ACC, DOT_FP32, PRECISION)
            tl.atomic_add(acc_ptr + tok[:, None] * stride_acc + offs_n[None, :], acc,
                          mask=valid[:, None] & n_ok, sem="relaxed")
        return
    rng = tl.program_id(0)
    tok_lo = rng.to(tl.int64) * range_tokens
    tok_hi = tl.minimum(tok_lo + range_tokens, n_tokens)
    init = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if HAS_BIAS:
        init += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC)[None, :]
    for m0 in range(tok_lo, tok_hi, BLOCK_M):
        toks = m0 + tl.arange(0, BLOCK_M)
        tl.store(acc_ptr + toks[:, None] * stride_acc + offs_n[None, :], init,
                 mask=(toks[:, None] < tok_hi) & n_ok)
    # A block's rows land in other threads than the previous block's: order the RMW in memory.
    tl.debug_barrier()
    for i in range(tl.load(range_start_ptr + rng), tl.load(range_start_ptr + rng + 1)):
        acc, tok, valid = _expand_block(
            tl.load(range_blocks_ptr + i), h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, gate_ptr,
            block_t_ptr, block_h_ptr, row_pair_ptr, binfo_ptr, offs_n, n_ok, N, n_slots,
            BLOCK_M, BLOCK_N, BLOCK_K, N_BUCKETS, GATED, ACC, DOT_FP32, PRECISION)
        out = acc_ptr + tok[:, None] * stride_acc + offs_n[None, :]
        mask = valid[:, None] & n_ok
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
        tl.debug_barrier()
    if SCRATCH:
        for m0 in range(tok_lo, tok_hi, BLOCK_M):
            toks = m0 + tl.arange(0, BLOCK_M)
            mask = (toks[:, None] < tok_hi) & n_ok
            v = tl.load(acc_ptr + toks[:, None] * stride_acc + offs_n[None, :], mask=mask)
            tl.store(out_ptr + toks[:, None] * stride_out + offs_n[None, :],
                     v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xty_plan_kernel(
    t_block_start_ptr, rank_of_t_ptr, plan_ptr, n_transforms, chunk_blocks, budget_rows,
    max_hot, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """One program scans the transforms (BLOCK_T at a time, with running carries) and writes the
    split X^T Y plan, int64: work_start [T + 1] (first work item of each transform: its chunks
    times its rank tiles), part_start [T + 1] (first partial rank row of each split transform)
    and hot [max_hot] (the split transforms in order, -1 after them).

    A transform with more than chunk_blocks blocks splits into cdiv(blocks, chunk_blocks) chunks
    while the partial rank rows asked for so far (in transform order) fit budget_rows; later
    ones stay whole. The plan depends on the routing only, so the result is deterministic."""
    work_start = plan_ptr
    part_start = plan_ptr + n_transforms + 1
    hot_ids = plan_ptr + 2 * (n_transforms + 1)
    zero = tl.zeros((BLOCK_T,), tl.int64)
    work_carry = tl.sum(zero, 0)
    part_carry = work_carry
    asked_carry = work_carry
    hot_carry = work_carry
    tl.store(work_start, work_carry)
    tl.store(part_start, work_carry)
    for t0 in range(0, n_transforms, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < n_transforms
        blocks = (tl.load(t_block_start_ptr + t + 1, mask=ok, other=0)
                  - tl.load(t_block_start_ptr + t, mask=ok, other=0))
        chunks = tl.cdiv(blocks, chunk_blocks)
        rank = tl.load(rank_of_t_ptr + t, mask=ok, other=0)
        asked = tl.where(ok & (chunks > 1), chunks * rank, zero)
        hot = (asked > 0) & (asked_carry + tl.cumsum(asked, 0) <= budget_rows)
        chunks = tl.where(hot, chunks, 1)
        work = tl.where(ok, chunks * tl.cdiv(rank, BLOCK_Q), zero)
        part = tl.where(hot, chunks * rank, zero)
        n_hot = tl.where(hot, 1, zero)
        tl.store(work_start + t + 1, work_carry + tl.cumsum(work, 0), mask=ok)
        tl.store(part_start + t + 1, part_carry + tl.cumsum(part, 0), mask=ok)
        tl.store(hot_ids + hot_carry + tl.cumsum(n_hot, 0) - 1, t.to(tl.int64), mask=hot)
        work_carry += tl.sum(work, 0)
        part_carry += tl.sum(part, 0)
        asked_carry += tl.sum(asked, 0)
        hot_carry += tl.sum(n_hot, 0)
    for h0 in range(hot_carry, max_hot, BLOCK_T):
        h = h0 + tl.arange(0, BLOCK_T)
        tl.store(hot_ids + h, zero - 1, mask=h < max_hot)


@triton.jit
def _xty_kernel(
    x_ptr, h_ptr, out_ptr, part_ptr, gate_ptr, t_block_start_ptr, block_h_ptr, row_pair_ptr,
    binfo_ptr, plan_ptr, P, n_slots, stride_xm, n_transforms,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, GATED: tl.constexpr, TRANSPOSED: tl.constexpr, SPLIT: tl.constexpr,
    ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    if SPLIT:
        # Work items (transform, chunk, rank tile) from the plan; the grid is a shape-only bound
        # and programs past the last item exit. t: the last transform with work_start[t] <= item.
        if item >= tl.load(plan_ptr + n_transforms):
            return
        lo = n_transforms * 0
        hi = n_transforms + 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            below = tl.load(plan_ptr + mid) <= item
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        t = lo
        b = _bucket(t, binfo_ptr, 0, N_BUCKETS)
        rank = tl.load(binfo_ptr + b * INFO + 1)
        q_tiles = tl.cdiv(rank, BLOCK_Q)
        first_item = tl.load(plan_ptr + t)
        n_chunks = (tl.load(plan_ptr + t + 1) - first_item) // q_tiles
        local = item - first_item
    else:
        # Items (transform, rank tile) per bucket, from binfo: every transform whole.
        b = _bucket(item, binfo_ptr, 2, N_BUCKETS)
        rank = tl.load(binfo_ptr + b * INFO + 1)
        local = item - tl.load(binfo_ptr + b * INFO + 2)
        q_tiles = tl.cdiv(rank, BLOCK_Q)
        t = tl.load(binfo_ptr + b * INFO) + local // q_tiles
        local = local % q_tiles  # the rank tile; chunk 0 of 1
        n_chunks = q_tiles // q_tiles
    chunk = local // q_tiles
    offs_q = (local % q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p[:, None] < P
    q_ok = offs_q[None, :] < rank
    first = tl.load(t_block_start_ptr + t)
    end = tl.load(t_block_start_ptr + t + 1)
    # Chunk c of n_chunks even chunks of t's blocks.
    per_chunk = tl.cdiv(end - first, n_chunks)
    row_lo = (first + chunk * per_chunk).to(tl.int64) * BLOCK_M
    row_hi = tl.minimum(first + (chunk + 1) * per_chunk, end).to(tl.int64) * BLOCK_M
    h_base = tl.load(block_h_ptr + first) - first.to(tl.int64) * BLOCK_M * rank
    acc = tl.zeros((BLOCK_P, BLOCK_Q), ACC)
    # t's blocks are consecutive rows, BLOCK_K (dividing BLOCK_M) per step.
    for row0 in range(row_lo, row_hi, BLOCK_K):
        rows = row0 + tl.arange(0, BLOCK_K)
        pair = tl.load(row_pair_ptr + rows)
        valid = pair >= 0
        tok = tl.where(valid, pair // n_slots, 0)
        xt = tl.load(x_ptr + tok[None, :] * stride_xm + offs_p[:, None],
                     mask=valid[None, :] & p_ok, other=0.0)
        h = tl.load(h_ptr + h_base + rows[:, None] * rank + offs_q[None, :],
                    mask=valid[:, None] & q_ok, other=0.0)
        if GATED:
            gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(ACC)
            h = (h.to(ACC) * gate[:, None]).to(h_ptr.dtype.element_ty)
        acc = _dot(xt, h, acc, DOT_FP32, PRECISION)
    # t's [P, r] (or [r, P]) block: in the flat gradient of all buckets after the rank rows before
    # it; a split transform's chunks go to the partial buffer instead (_xty_reduce_kernel).
    if TRANSPOSED:
        tile = offs_q[None, :] * P + offs_p[:, None]
    else:
        tile = offs_p[:, None] * rank + offs_q[None, :]
    if n_chunks > 1:
        base = (tl.load(plan_ptr + n_transforms + 1 + t) + chunk * rank) * P
        tl.store(part_ptr + base + tile, acc.to(part_ptr.dtype.element_ty), mask=p_ok & q_ok)
    else:
        t0 = tl.load(binfo_ptr + b * INFO)
        base = (tl.load(binfo_ptr + b * INFO + 3) + (t - t0) * rank) * P
        tl.store(out_ptr + base + tile, acc.to(out_ptr.dtype.element_ty), mask=p_ok & q_ok)


@triton.jit
def _xty_reduce_kernel(
    part_ptr, out_ptr, binfo_ptr, plan_ptr, P, n_transforms,
    BLOCK_E: tl.constexpr, BLOCK_Q: tl.constexpr, N_BUCKETS: tl.constexpr,
):
    """The flat-gradient block of split transform hot[program 0] = the sum of its chunks'
    partials in chunk order (deterministic); programs along axis 1 stride over its r x P
    elements."""
    t = tl.load(plan_ptr + 2 * (n_transforms + 1) + tl.program_id(0))
    if t < 0:
        return
    b = _bucket(t, binfo_ptr, 0, N_BUCKETS)
    rank = tl.load(binfo_ptr + b * INFO + 1)
    n_chunks = (tl.load(plan_ptr + t + 1) - tl.load(plan_ptr + t)) // tl.cdiv(rank, BLOCK_Q)
    size = rank * P
    src = part_ptr + tl.load(plan_ptr + n_transforms + 1 + t) * P
    t0 = tl.load(binfo_ptr + b * INFO)
    dst = out_ptr + (tl.load(binfo_ptr + b * INFO + 3) + (t - t0) * rank) * P
    for e0 in range(tl.program_id(1) * BLOCK_E, size, tl.num_programs(1) * BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        ok = offs < size
        acc = tl.load(src + offs, mask=ok, other=0.0)
        for c in range(1, n_chunks):
            acc += tl.load(src + c * size + offs, mask=ok, other=0.0)
        tl.store(dst + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
