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
- ``_expand_kernel``: out[token(rows)] += (g) H @ W_t, summed over a token's blocks by the
  layout's combine (``configs.COMBINES``). Forward: H = h_pre gated, W = U^T -> y (+ b_dec);
  backward: H = g dH, W = V -> dx. No [pairs, width] slot buffer in any of them.
  "fixed" (default below fp64; (blocks in window order, width tiles)): each program adds its
  rows into an int32 [tokens, width] accumulator as fixed-point numbers at the row's scale, with
  integer atomics. Integer addition is associative, so the sum is bitwise the same whatever
  order the adds land in: deterministic with atomics. The scale 2^(FIXED_BITS - e) comes from a
  bound on the row's sum: the shrink that made H folds each pair's |g| ||h||_2 x
  ``_fixed_prologue_kernel``'s max_c ||W_t[c]||_2 (which bounds every element of its contribution)
  into its token's (max, count) with integer atomics, from which the expand and
  ``_fixed_finish_kernel`` (the cast out, + bias) read the row's exponent e; a non-finite bound
  makes its row NaN. "ranges" (fp64; (token ranges, width tiles)): a program
  owns its range's rows of the output tile and read-modify-writes them block by block in table
  order (one writer, fixed order); half outputs accumulate in an fp32 scratch it casts out.
  "atomic" (opt-in, nondeterministic): as "fixed" with fp32 atomics into a scratch holding the
  bias; the order of the adds, hence the rounding, varies from run to run.
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

from ..configs import FIXED_POINT_BITS

# Columns of a binfo row.
INFO_COLUMNS = 4
INFO = tl.constexpr(INFO_COLUMNS)
# The fixed combine: a token row's sum holds FIXED_POINT_BITS bits of its bound 2^e; the bound
# takes BOUND_MARGIN for the roundings between the pair norms and the values added (bf16 h and
# weight tiles: < 1%); e >= E_MIN keeps 2^(FIXED_BITS - e) a normal fp32 number, and
# E_NON_FINITE (> 127) marks a row whose bound is not finite.
FIXED_BITS = tl.constexpr(FIXED_POINT_BITS)
BOUND_MARGIN = tl.constexpr(1.0625)
E_MIN = tl.constexpr(-96)
E_NON_FINITE = tl.constexpr(1 << 10)


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
def _transform_weights(t, binfo_ptr, w0, w1, w2, w3, w4, w5, w6, w7, width,
                       N_BUCKETS: tl.constexpr):
    """(rank, pointer to W_t): transform t's r x width block in its bucket's weight tensor."""
    b = _bucket(t, binfo_ptr, 0, N_BUCKETS)
    rank = tl.load(binfo_ptr + b * INFO + 1)
    w_t = _weights(b, w0, w1, w2, w3, w4, w5, w6, w7, N_BUCKETS)
    return rank, w_t + (t - tl.load(binfo_ptr + b * INFO)) * rank * width


@triton.jit
def _block_pairs(block, row_pair_ptr, BLOCK_M: tl.constexpr):
    """(flat pair id of each of the block's rows, row is routed)."""
    pair = tl.load(row_pair_ptr + block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))
    return pair, pair >= 0


@triton.jit
def _fold_pair_bound(bound, tok, valid, row_stat_ptr, n_tokens):
    """row_stat[0, tok] = max of its pairs' bounds (fp32 bits: for values >= 0 the int32 order is
    the float order), row_stat[1, tok] = its pair count. NaN bounds count as +inf."""
    bound = tl.where(bound == bound, bound, float("inf"))
    tl.atomic_max(row_stat_ptr + tok, bound.to(tl.int32, bitcast=True), mask=valid,
                  sem="relaxed")
    tl.atomic_add(row_stat_ptr + n_tokens + tok, tl.full(tok.shape, 1, tl.int32), mask=valid,
                  sem="relaxed")


@triton.jit
def _fixed_prologue_kernel(
    w0, w1, w2, w3, w4, w5, w6, w7, norm_ptr, binfo_ptr, zero_ptr, N, n_zero,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_BUCKETS: tl.constexpr,
    RANK_MAJOR: tl.constexpr,
):
    """The fixed combine's prologue, a program per transform t: norm[t] = max over the N width
    positions c of ||W_t[c, :]||_2 in fp32, W_t = U_t [N, r] or V_t [r, N] (RANK_MAJOR); +inf when
    W_t holds a non-finite value (its sum of squares is then not finite). Each program also zeroes
    its share of the n_zero int32 elements at zero_ptr (the row bounds and the accumulator)."""
    t = tl.program_id(0)
    share = tl.cdiv(n_zero, tl.num_programs(0))
    lo = t.to(tl.int64) * share
    for i in range(lo, tl.minimum(lo + share, n_zero), BLOCK_N * BLOCK_K):
        offs = i + tl.arange(0, BLOCK_N * BLOCK_K)
        tl.store(zero_ptr + offs, tl.zeros((BLOCK_N * BLOCK_K,), tl.int32),
                 mask=offs < tl.minimum(lo + share, n_zero))
    rank, w_t = _transform_weights(t, binfo_ptr, w0, w1, w2, w3, w4, w5, w6, w7, N, N_BUCKETS)
    best = tl.zeros((BLOCK_N,), tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        sq = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, rank, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            if RANK_MAJOR:
                tile = w_t + kk[None, :] * N + offs_n[:, None]
            else:
                tile = w_t + offs_n[:, None] * rank + kk[None, :]
            w = tl.load(tile, mask=(offs_n[:, None] < N) & (kk[None, :] < rank),
                        other=0.0).to(tl.float32)
            sq += tl.sum(w * w, axis=1)
        best = tl.maximum(best, sq)
        total += sq
    norm = tl.sqrt(tl.max(best, axis=0))
    tl.store(norm_ptr + t, tl.where(tl.sum(total, axis=0) < float("inf"), norm, float("inf")))


@triton.jit
def _shrink_kernel(
    a_ptr, w0, w1, w2, w3, w4, w5, w6, w7, h_ptr, dh_ptr, gate_ptr, dgate_ptr,
    block_order_ptr, block_t_ptr, block_h_ptr, row_pair_ptr, binfo_ptr, blocks_used_ptr,
    norm_ptr, row_stat_ptr, K, n_slots, n_blocks, h_size, stride_am, n_tokens,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, BACKWARD: tl.constexpr, BOUND: tl.constexpr, ACC: tl.constexpr,
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
    rank, w_t = _transform_weights(t, binfo_ptr, w0, w1, w2, w3, w4, w5, w6, w7, K, N_BUCKETS)
    pair, valid = _block_pairs(block, row_pair_ptr, BLOCK_M)
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
    if BOUND:
        # |(g) H @ W_t| <= |g| ||h||_2 max_c ||W_t[c]||_2 elementwise: the pair's bound, folded
        # into its token's (max, count) with integer atomics (order-free, so deterministic).
        # From the rows just stored (what the combine will read; g dH holds its gate), re-read
        # here rather than summed in the loop above, whose registers are full at large tiles.
        tl.debug_barrier()
        sumsq = tl.zeros((BLOCK_M,), tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            v = tl.load((dh_ptr if BACKWARD else h_ptr) + h_rows + offs_r[None, :],
                        mask=offs_r[None, :] < rank, other=0.0).to(tl.float32)
            sumsq += tl.sum(v * v, axis=1)
        bound = tl.sqrt(sumsq) * tl.load(norm_ptr + t)
        if not BACKWARD:
            bound *= tl.abs(tl.load(gate_ptr + pair, mask=valid, other=0.0).to(tl.float32))
        _fold_pair_bound(bound, tl.where(valid, pair // n_slots, 0), valid, row_stat_ptr,
                         n_tokens)


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
    rank, w_t = _transform_weights(t, binfo_ptr, w0, w1, w2, w3, w4, w5, w6, w7, N, N_BUCKETS)
    pair, valid = _block_pairs(block, row_pair_ptr, BLOCK_M)
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
def _row_exponent(row_stat_ptr, tok, ok, n_tokens):
    """The exponent e of each token row ``tok``: the least with 2^e >= BOUND_MARGIN x pairs x
    max pair bound (row_stat, see _fold_pair_bound), at least E_MIN; E_NON_FINITE for a
    non-finite bound. From the bits of that product: exact, unlike a log2."""
    top = tl.load(row_stat_ptr + tok, mask=ok, other=0).to(tl.float32, bitcast=True)
    count = tl.load(row_stat_ptr + n_tokens + tok, mask=ok, other=0).to(tl.float32)
    bits = (top * count * BOUND_MARGIN).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 255
    exponent = biased - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.where(biased == 255, E_NON_FINITE, tl.maximum(exponent, E_MIN))


@triton.jit
def _fixed_scale(exponent, TO_FIXED: tl.constexpr):
    """2^(FIXED_BITS - e) (TO_FIXED) or 2^(e - FIXED_BITS), built from its bits: exact, and e in
    [E_MIN, 127] keeps both normal fp32 numbers."""
    if TO_FIXED:
        bits = (127 + FIXED_BITS - exponent) << 23
    else:
        bits = (127 - FIXED_BITS + exponent) << 23
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _expand_kernel(
    h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, acc_ptr, out_ptr, bias_ptr, gate_ptr,
    range_blocks_ptr, range_start_ptr, block_order_ptr, block_t_ptr, block_h_ptr, row_pair_ptr,
    binfo_ptr, row_stat_ptr, N, n_tokens, range_tokens, n_slots, stride_acc, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_BUCKETS: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCRATCH: tl.constexpr, COMBINE: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n[None, :] < N
    if COMBINE != "ranges":
        # A program per (block in window order, width tile) adds its rows into acc with atomics:
        # "fixed": int32 fixed point at the row's scale (acc zeroed, rows of a non-finite bound
        # skipped: _fixed_finish_kernel writes them NaN); "atomic" (opt-in, nondeterministic):
        # fp32, acc holding the bias or zero, the order of the adds (hence the rounding) varying.
        block = tl.load(block_order_ptr + tl.program_id(0))
        if tl.load(block_t_ptr + block) >= 0:
            acc, tok, valid = _expand_block(
                block, h_ptr, w0, w1, w2, w3, w4, w5, w6, w7, gate_ptr, block_t_ptr,
                block_h_ptr, row_pair_ptr, binfo_ptr, offs_n, n_ok, N, n_slots,
                BLOCK_M, BLOCK_N, BLOCK_K, N_BUCKETS, GATED, ACC, DOT_FP32, PRECISION)
            if COMBINE == "fixed":
                exponent = _row_exponent(row_stat_ptr, tok, valid, n_tokens)
                valid = valid & (exponent <= 127)
                scaled = acc.to(tl.float32) * _fixed_scale(exponent, True)[:, None]
                acc = tl.floor(scaled + 0.5).to(tl.int32)
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
def _fixed_finish_kernel(
    acc_ptr, row_stat_ptr, bias_ptr, out_ptr, n_tokens, N, stride_acc, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out = acc x 2^(e - FIXED_BITS) (+ bias), NaN on rows of a non-finite bound."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = toks < n_tokens
    mask = ok[:, None] & (offs_n[None, :] < N)
    exponent = _row_exponent(row_stat_ptr, toks, ok, n_tokens)
    finite = exponent <= 127
    scale = _fixed_scale(tl.where(finite, exponent, 0), False)
    v = tl.load(acc_ptr + toks[:, None] * stride_acc + offs_n[None, :], mask=mask, other=0)
    v = v.to(tl.float32) * scale[:, None]
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    v = tl.where(finite[:, None], v, float("nan"))
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
