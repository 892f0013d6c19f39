"""Triton kernels of the fused gated top-k (forward and backward); launched from ``launch.py``.

Fused gated top-k in Triton: act(x W_gate^T + b_gate) and its top k per token, never writing the
[tokens, T] logits.

Forward. A program owns BLOCK_N tokens and sweeps T in tiles of BLOCK_T: it computes the tile with
tl.dot (fp32 accumulation), applies the activation, packs each value with its transform id into an
int64 key (order-preserving float bits above, ``IDX_BASE - t`` below, so one integer order ranks by
value and then by lower id) and merges the tile's top K_PAD keys into its running list. The running
list is kept ascending and the tile's top K_PAD descending, so their elementwise max is the top half
of the union as a bitonic sequence and one bitonic merge re-sorts it. With few token blocks, T is
split across programs that write partial lists, and a second kernel merges them (split-T).
fp64 inputs do not use the selection kernel (64 bits cannot hold a double and an id, and ranking
values rounded to fp32 would break near-ties): their dense activations are ranked exactly instead.

Backward. Gradients flow only through the N*k selected pairs: a pair kernel forms d pre (and the
jumprelu threshold term, recomputing pre only where the gate is 0), dx gathers the selected W rows
in slot order, and dW_gate / db_gate / d log_threshold reduce each transform's pairs in the fixed
order of ``route_pairs``; transforms with more than GROUP blocks of pairs are cut into chunks
reduced by a second kernel, so a hot transform never serialises onto one program. No atomics.

``k=None`` (all T) computes the dense activations with the same tile code; its backward is dense
PyTorch matmuls (the [tokens, T] output exists anyway). k > MAX_K_PAD falls back to dense
activations plus a PyTorch selection.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sort import KEY_MIN, _merge_top, _pack_keys, _store_topk, _topk_desc


@triton.jit
def _activate(pre, theta, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        # pre < 0 rather than max(pre, 0): NaN stays NaN, as torch.relu keeps it.
        return tl.where(pre < 0, 0.0, pre)
    elif ACTIVATION == "jumprelu":
        return tl.where(pre > theta, pre, 0.0)
    else:
        return pre


@triton.jit
def _gate_tile(
    x_ptr, w_ptr, b_ptr, theta_ptr, rows64, cols, N, D, T, stride_xn, stride_wt,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """act(x[rows] W[cols]^T + b[cols]) as a [rows, cols] tile in ACC_DTYPE; the matmul runs in
    x's dtype (W, e.g. fp32 master weights, cast to it per tile, as autocast would) with
    ACC_DTYPE accumulation; fp32 dots use PRECISION ("ieee": true fp32, "tf32" when opted into).
    DOT_FP32 multiplies 16-bit tiles in fp32 instead (exact products, so the same sums): the
    launchers set it only under the interpreter, see _dot_fp32."""
    cols64 = cols.to(tl.int64)
    row_ok = rows64 < N
    col_ok = cols < T
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + rows64[:, None] * stride_xn + offs_d[None, :]
    w_ptrs = w_ptr + cols64[None, :] * stride_wt + offs_d[:, None]
    acc = tl.zeros((rows64.shape[0], cols.shape[0]), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        wt = wt.to(xt.dtype)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    pre = acc + tl.load(b_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    theta = 0.0
    if ACTIVATION == "jumprelu":
        theta = tl.load(theta_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    return _activate(pre, theta, ACTIVATION)


@triton.jit
def _gate_topk_fwd_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, gates_ptr, idx_ptr, part_ptr,
    N, D, T, K, t_per_split, stride_xn, stride_wt, stride_part,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """Running top-K_PAD of act(x W^T + b) over T[pid_s * t_per_split :][: t_per_split].

    With one program along T it writes gates [N, K] and indices [N, K]; with several (split-T),
    each writes its ascending list to part [n_split, N, K_PAD] for the merge kernel.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows64 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    t_begin = pid_s * t_per_split
    t_end = tl.minimum(T, t_begin + t_per_split)
    run = tl.full((BLOCK_N, K_PAD), KEY_MIN, tl.int64)
    for t0 in range(t_begin, t_end, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        act = _gate_tile(x_ptr, w_ptr, b_ptr, theta_ptr, rows64, cols, N, D, T, stride_xn,
                         stride_wt, ACTIVATION, gates_ptr.dtype.element_ty, BLOCK_D,
                         DOT_FP32, PRECISION)
        keys = tl.where((cols < t_end)[None, :], _pack_keys(act, cols), KEY_MIN)
        run = _merge_top(run, _topk_desc(keys, K_PAD), K_PAD)
    if tl.num_programs(1) > 1:
        offs = pid_s.to(tl.int64) * stride_part + rows64[:, None] * K_PAD
        tl.store(part_ptr + offs + tl.arange(0, K_PAD)[None, :], run,
                 mask=(rows64 < N)[:, None])
    else:
        _store_topk(run, rows64, gates_ptr, idx_ptr, N, K, K_PAD)


@triton.jit
def _gate_topk_merge_kernel(
    part_ptr, gates_ptr, idx_ptr, N, K, n_split, stride_part,
    BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
):
    """Merge the n_split ascending partial lists of part [n_split, N, K_PAD] in split order."""
    rows64 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    # Read each partial list backwards, i.e. descending, to pair it with the ascending running list.
    part_ptrs = part_ptr + rows64[:, None] * K_PAD + (K_PAD - 1 - tl.arange(0, K_PAD))[None, :]
    run = tl.full((BLOCK_N, K_PAD), KEY_MIN, tl.int64)
    for _ in range(n_split):
        part = tl.load(part_ptrs, mask=(rows64 < N)[:, None], other=KEY_MIN)
        run = _merge_top(run, part, K_PAD)
        part_ptrs += stride_part
    _store_topk(run, rows64, gates_ptr, idx_ptr, N, K, K_PAD)


@triton.jit
def _gate_dense_fwd_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, gates_ptr, N, D, T, stride_xn, stride_wt,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gates [N, T] = act(x W^T + b), every transform."""
    rows64 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    act = _gate_tile(x_ptr, w_ptr, b_ptr, theta_ptr, rows64, cols, N, D, T, stride_xn, stride_wt,
                     ACTIVATION, gates_ptr.dtype.element_ty, BLOCK_D, DOT_FP32, PRECISION)
    tl.store(gates_ptr + rows64[:, None] * T + cols[None, :], act,
             mask=(rows64 < N)[:, None] & (cols < T)[None, :])


@triton.jit
def _pair_pre(x_ptr, w_ptr, b_ptr, tok, t, need, D, stride_xn, stride_wt,
              ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """pre = x[tok] . W[t] + b[t] per pair where ``need`` (memory is only read there), else 0.

    Products are formed as in the forward tile (W rounded to x's dtype)."""
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + tok[:, None] * stride_xn + offs_d[None, :]
    w_ptrs = w_ptr + t[:, None] * stride_wt + offs_d[None, :]
    acc = tl.zeros(tok.shape, ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        mask = need[:, None] & ((d0 + offs_d) < D)[None, :]
        xv = tl.load(x_ptrs, mask=mask, other=0.0)
        wv = tl.load(w_ptrs, mask=mask, other=0.0).to(xv.dtype)
        acc += tl.sum(xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE), axis=1)
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return acc + tl.load(b_ptr + t, mask=need, other=0.0)


@triton.jit
def _gate_pairs_bwd_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, idx_ptr, gates_ptr, dgates_ptr, dpre_ptr, dthr_ptr,
    P, K, D, stride_xn, stride_wt, bandwidth,
    ACTIVATION: tl.constexpr, THRESHOLD_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per selected pair: d pre = dgate * act'(pre), and for jumprelu the straight-through term
    dgate * (-theta^2 / eps) * 1[|pre - theta| < eps / 2] of d log_threshold."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < P
    gate = tl.load(gates_ptr + p, mask=valid, other=0.0)
    dgate = tl.load(dgates_ptr + p, mask=valid, other=0.0)
    if ACTIVATION == "relu":
        # gate <= 0 rather than !(gate > 0): a NaN gate passes its gradient, as torch.relu's does.
        dpre = tl.where(gate <= 0, 0.0, dgate)
    elif ACTIVATION == "jumprelu":
        t = tl.load(idx_ptr + p, mask=valid, other=0)
        theta = tl.load(theta_ptr + t, mask=valid, other=0.0)
        # A non-zero gate is pre itself; only gates cut to 0 need pre recomputed.
        pre = gate
        if THRESHOLD_GRAD:
            cut = valid & (gate == 0)
            pre = tl.where(cut, _pair_pre(x_ptr, w_ptr, b_ptr, p // K, t, cut, D, stride_xn,
                                          stride_wt, dpre_ptr.dtype.element_ty, BLOCK_D), gate)
            window = tl.abs(pre - theta) < bandwidth / 2
            tl.store(dthr_ptr + p, tl.where(window, dgate * (-theta * theta / bandwidth), 0.0),
                     mask=valid)
        dpre = tl.where(pre > theta, dgate, 0.0)
    else:
        dpre = dgate
    tl.store(dpre_ptr + p, dpre, mask=valid)


@triton.jit
def _gate_bwd_dx_kernel(
    dpre_ptr, idx_ptr, w_ptr, dx_ptr, N, K, D, stride_wt, stride_dxn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[n] = sum_j dpre[n, j] * W[idx[n, j]], slots in order (deterministic, no atomics)."""
    rows64 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows64 < N
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dpre_ptr.dtype.element_ty)
    for j in range(K):
        dp = tl.load(dpre_ptr + rows64 * K + j, mask=row_ok, other=0.0)
        t = tl.load(idx_ptr + rows64 * K + j, mask=row_ok, other=0)
        # Pairs with d pre = 0 (e.g. relu gates at 0) read no weights.
        w = tl.load(w_ptr + t[:, None] * stride_wt + offs_d[None, :],
                    mask=(dp != 0)[:, None] & d_ok[None, :], other=0.0)
        # W as stored (fp32 master weights stay fp32): the gradient of the layer, not of the
        # forward's rounding of W to x's dtype; the dense GEMM pair does the same.
        acc += dp[:, None] * w.to(acc.dtype)
    tl.store(dx_ptr + rows64[:, None] * stride_dxn + offs_d[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _gate_bwd_dw_kernel(
    x_ptr, dpre_ptr, dthr_ptr, pair_of_row_ptr, transform_of_block_ptr, first_block_ptr,
    n_blocks_ptr, chunk_base_ptr, dw_ptr, db_ptr, dthr_out_ptr, part_ptr, part_s_ptr,
    K, D, stride_xn, stride_dwt,
    THRESHOLD_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Sum of d pre * x (and of d pre, d thr) over up to GROUP routed blocks of one transform.

    The program of a transform's block j (j % GROUP == 0) owns blocks j .. j + GROUP - 1. A
    transform with at most GROUP blocks is written to dW/db/d thr directly; a longer one writes
    its chunk to part/part_s for _gate_bwd_dw_reduce_kernel.
    """
    block = tl.program_id(0)
    t = tl.load(transform_of_block_ptr + block)
    if t >= 0:
        local = block - tl.load(first_block_ptr + t)
        if local % GROUP == 0:
            n_blocks = tl.load(n_blocks_ptr + t)
            n_mine = tl.minimum(n_blocks - local, GROUP)
            rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            acc_dtype = dpre_ptr.dtype.element_ty
            # Rows accumulate elementwise over the blocks; one reduction across rows at the end.
            db_rows = tl.zeros((BLOCK_M,), acc_dtype)
            dthr_rows = tl.zeros((BLOCK_M,), acc_dtype)
            for g in range(n_mine):
                pair = tl.load(pair_of_row_ptr + rows + g * BLOCK_M)
                db_rows += tl.load(dpre_ptr + pair, mask=pair >= 0, other=0.0)
                if THRESHOLD_GRAD:
                    dthr_rows += tl.load(dthr_ptr + pair, mask=pair >= 0, other=0.0)
            hot = n_blocks > GROUP
            slot = tl.load(chunk_base_ptr + t) + local // GROUP
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                acc = tl.zeros((BLOCK_M, BLOCK_D), acc_dtype)
                for g in range(n_mine):
                    pair = tl.load(pair_of_row_ptr + rows + g * BLOCK_M)
                    dp = tl.load(dpre_ptr + pair, mask=pair >= 0, other=0.0)
                    xv = tl.load(x_ptr + (pair // K)[:, None] * stride_xn + offs_d[None, :],
                                 mask=(dp != 0)[:, None] & d_ok[None, :], other=0.0)
                    acc += dp[:, None] * xv.to(acc_dtype)
                dw = tl.sum(acc, axis=0)
                if hot:
                    tl.store(part_ptr + slot * D + offs_d, dw, mask=d_ok)
                else:
                    tl.store(dw_ptr + t * stride_dwt + offs_d, dw, mask=d_ok)
            db = tl.sum(db_rows)
            dthr = tl.sum(dthr_rows)
            if hot:
                tl.store(part_s_ptr + 2 * slot, db)
                tl.store(part_s_ptr + 2 * slot + 1, dthr)
            else:
                tl.store(db_ptr + t, db)
                if THRESHOLD_GRAD:
                    tl.store(dthr_out_ptr + t, dthr)


@triton.jit
def _gate_bwd_dw_reduce_kernel(
    part_ptr, part_s_ptr, hot_ptr, chunk_base_ptr, n_chunks_ptr, dw_ptr, db_ptr, dthr_out_ptr,
    D, stride_dwt, THRESHOLD_GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dW/db/d thr of one hot transform: its chunks' partial sums, added in chunk order."""
    t = tl.load(hot_ptr + tl.program_id(0))
    if t >= 0:
        base = tl.load(chunk_base_ptr + t)
        n_chunks = tl.load(n_chunks_ptr + t)
        db = tl.load(part_s_ptr + 2 * base)
        dthr = tl.load(part_s_ptr + 2 * base + 1)
        for c in range(1, n_chunks):
            db += tl.load(part_s_ptr + 2 * (base + c))
            dthr += tl.load(part_s_ptr + 2 * (base + c) + 1)
        tl.store(db_ptr + t, db)
        if THRESHOLD_GRAD:
            tl.store(dthr_out_ptr + t, dthr)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            acc = tl.load(part_ptr + base * D + offs_d, mask=d_ok, other=0.0)
            for c in range(1, n_chunks):
                acc += tl.load(part_ptr + (base + c) * D + offs_d, mask=d_ok, other=0.0)
            tl.store(dw_ptr + t * stride_dwt + offs_d, acc, mask=d_ok)
