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

import triton
import triton.language as tl


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
