"""Fused gated top-k in Triton: act(x W_gate^T + b_gate) and its top k per token, never writing the
[tokens, T] logits.

Forward. A program owns BLOCK_N tokens and sweeps T in tiles of BLOCK_T: it computes the tile with
tl.dot (fp32 accumulation), applies the activation, packs each value with its transform id into an
int64 key (order-preserving float bits above, ``IDX_BASE - t`` below, so one integer order ranks by
value and then by lower id) and merges the tile's top K_PAD keys into its running list. The running
list is kept ascending and the tile's top K_PAD descending, so their elementwise max is the top half
of the union as a bitonic sequence and one bitonic merge re-sorts it. With few token blocks, T is
split across programs that write partial lists, and a second kernel merges them (split-T).
For fp64 inputs the keys hold the value rounded to fp32 (64 bits cannot hold a double and an id),
and the selected gates are then recomputed exactly in fp64.

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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backend import triton_interpreting
from ...gpu_report import KernelBuild
from ..routing import route_pairs
from .activation import jumprelu_threshold_grad
from .torch import topk_lowest_index

# Packed keys store IDX_BASE - t in their low 32 bits, so among equal values the lower id is larger.
IDX_BASE = tl.constexpr(2**31 - 1)
KEY_MIN = tl.constexpr(-(2**63))
# Largest running list kept in registers; larger k takes the dense fallback.
MAX_K_PAD = 256
# The smallest list the selection kernels keep: smaller k would only add compile variants.
MIN_K_PAD = 8
ACTIVATIONS = ("relu", "jumprelu", "identity")
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels


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
    DOT_FP32: tl.constexpr,
):
    """act(x[rows] W[cols]^T + b[cols]) as a [rows, cols] tile in ACC_DTYPE; the matmul runs in
    x's dtype (W cast to it, as autocast would) with ACC_DTYPE accumulation, fp32 as "ieee"
    (true fp32, not tf32). DOT_FP32 multiplies 16-bit tiles in fp32 instead (exact products, so
    the same sums): the launchers set it only under the interpreter, see _dot_fp32."""
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
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    pre = acc + tl.load(b_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    theta = 0.0
    if ACTIVATION == "jumprelu":
        theta = tl.load(theta_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    return _activate(pre, theta, ACTIVATION)


@triton.jit
def _pack_keys(act, cols):
    """int64 keys whose signed order is (value as fp32, then lower id); NaN ranks above +inf."""
    v = act.to(tl.float32)
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v == 0, 0, bits)  # -0.0 and +0.0 are one value, so ties go by id
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(v != v, 0x7FFFFFFF, ordered)  # torch.sort ranks NaN first
    low = IDX_BASE - cols.to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def _unpack_keys(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    t = IDX_BASE - (keys & 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True), t


# Sorting networks on int64 keys along the last axis, after triton.language.standard's bitonic sort
# (tl.sort / tl.topk / tl.bitonic_merge), with one change: a compare-exchange finds each element's
# partner as (pair sum) - self instead of (pair xor) ^ self. On the GPU both are one size-2
# reduction (an int64 sum may wrap, and unwraps exactly when self is subtracted); under
# TRITON_INTERPRET=1 a sum runs in numpy while an xor-reduction runs element by element in
# Python, hundreds of times slower.


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """Merge bitonic runs of 2**stage along the hypercube h ([2] * n); order 0 ascending,
    1 descending, 2 alternating (so that the next stage sees bitonic runs)."""
    n_dims: tl.constexpr = _log2(h.numel)
    if order == 2:
        flip = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage - 1) + [2] + [1] * stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        # Compare-exchange along axis n_dims - stage + i (the (stage - 1 - i)-th innermost).
        partner = tl.sum(h, axis=n_dims - stage + i, keep_dims=True) - h
        is_right = tl.reshape(tl.arange(0, 2),
                              [1] * (n_dims - stage + i) + [2] + [1] * (stage - 1 - i))
        h = tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)
    return h


@triton.jit
def _topk_desc(x, K: tl.constexpr):
    """The K largest keys of each row of x [R, C], descending (R, C, K powers of 2, K <= C)."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    if log_k == 0:
        return tl.max(x, axis=1, keep_dims=True)
    else:
        h = tl.reshape(x, [2] * _log2(x.numel))
        for i in tl.static_range(1, log_k + 1):
            h = _bitonic_stage(h, i, 2 if i < log_n else 1)
        # Bitonic top-k: keep the larger half of each pair of sorted runs, re-merge, repeat.
        for i in tl.static_range(log_k + 1, log_n + 1):
            h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
            h = _bitonic_stage(h, log_k, 2 if i < log_n else 1)
        return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _merge_top(run_asc, top_desc, K_PAD: tl.constexpr):
    """Top K_PAD of two sorted lists [R, K_PAD] (ascending, descending), returned ascending.

    Their elementwise max is the top half of the union as a bitonic sequence; one merge sorts it.
    """
    top = tl.maximum(run_asc, top_desc)
    if K_PAD == 1:
        return top
    else:
        h = _bitonic_stage(tl.reshape(top, [2] * _log2(top.numel)), _log2(K_PAD), 0)
        return tl.reshape(h, top.shape)


@triton.jit
def _store_topk(run_asc, rows64, gates_ptr, idx_ptr, N, K, K_PAD: tl.constexpr):
    # Position p of the ascending list holds rank K_PAD - 1 - p.
    rank = K_PAD - 1 - tl.arange(0, K_PAD)
    value, t = _unpack_keys(run_asc)
    offs = rows64[:, None] * K + rank[None, :]
    mask = (rows64 < N)[:, None] & (rank < K)[None, :]
    tl.store(gates_ptr + offs, value, mask=mask)
    tl.store(idx_ptr + offs, t, mask=mask)


@triton.jit
def _gate_topk_fwd_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, gates_ptr, idx_ptr, part_ptr,
    N, D, T, K, t_per_split, stride_xn, stride_wt, stride_part,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
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
                         DOT_FP32)
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
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gates [N, T] = act(x W^T + b), every transform."""
    rows64 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    act = _gate_tile(x_ptr, w_ptr, b_ptr, theta_ptr, rows64, cols, N, D, T, stride_xn, stride_wt,
                     ACTIVATION, gates_ptr.dtype.element_ty, BLOCK_D, DOT_FP32)
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
def _gate_pairs_fwd_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, idx_ptr, gates_ptr, P, K, D, stride_xn, stride_wt,
    ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gates[p] = act(pre), recomputed in the gates' dtype, for the P = N*K selected pairs."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < P
    t = tl.load(idx_ptr + p, mask=valid, other=0)
    pre = _pair_pre(x_ptr, w_ptr, b_ptr, p // K, t, valid, D, stride_xn, stride_wt,
                    gates_ptr.dtype.element_ty, BLOCK_D)
    theta = 0.0
    if ACTIVATION == "jumprelu":
        theta = tl.load(theta_ptr + t, mask=valid, other=0.0)
    tl.store(gates_ptr + p, _activate(pre, theta, ACTIVATION), mask=valid)


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
        dpre = tl.where(gate > 0, dgate, 0.0)
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
        # W rounded to x's dtype, as the forward's products used it.
        acc += dp[:, None] * w.to(dx_ptr.dtype.element_ty).to(acc.dtype)
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


# ----------------------------------------------------------------------------------------------
# Launch configuration: every block size and warp count is chosen here.


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
    return max(MIN_K_PAD, triton.next_power_of_2(k))


def fwd_config(k: int, x_dtype: torch.dtype) -> FwdConfig | None:
    """Selection-kernel tiles for k and x's dtype; None when k needs the dense fallback."""
    k_pad = k_pad_for(k)
    if k_pad > MAX_K_PAD:
        return None
    # The tile must hold K_PAD candidates. Its int64 keys, their top K_PAD and the running list
    # share the registers with the accumulator, so longer lists take fewer tokens per program;
    # fp32 (ieee, no tensor cores) and fp64 dots hold more per thread, so they take 16 tokens.
    # Every choice here compiles without spills on sm_80 and sm_90 (see gpu_report_builds).
    if x_dtype in _HALF:
        block_n = 64 if k_pad <= 64 else (32 if k_pad == 128 else 16)
        block_t, num_warps = max(k_pad, 128), 8
    else:
        block_n = 16
        block_t = max(k_pad, 64 if x_dtype == torch.float64 else 128)
        num_warps = 8 if block_t > 128 else 4
    # fp32 ("ieee") and fp64 dots run on the FMA units, so a deeper load pipeline buys little,
    # and its registers make ptxas spill.
    num_stages = 3 if x_dtype in _HALF else 2
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


def _dot_fp32(x_dtype: torch.dtype) -> bool:
    # triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits in tl.dot; on the
    # GPU the tiles always go to the tensor cores in their own dtype.
    return x_dtype == torch.bfloat16 and triton_interpreting()


def _acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _kernel_weight(W: Tensor, x_dtype: torch.dtype) -> Tensor:
    """W as the kernels read it: its own dtype when that is x's or fp32 under half x (cast per
    tile, saving a copy), else a copy in x's dtype; unit inner stride."""
    keep = W.dtype == x_dtype or (W.dtype == torch.float32 and x_dtype in _HALF)
    return (W if keep else W.to(x_dtype)).contiguous()


def _theta(
    activation: str, log_threshold: Tensor | None, acc: torch.dtype, placeholder: Tensor
) -> Tensor:
    """theta = exp(log_threshold) in log_threshold's dtype, then cast: exactly the torch
    backend's. Without jumprelu the kernels never read it and get ``placeholder``."""
    if activation != "jumprelu":
        return placeholder
    return log_threshold.exp().to(acc).contiguous()


# ----------------------------------------------------------------------------------------------
# Launchers


def _forward_dense(x: Tensor, W: Tensor, b: Tensor, theta: Tensor, activation: str) -> Tensor:
    n, d = x.shape
    n_t = W.shape[0]
    gates = torch.empty(n, n_t, dtype=b.dtype, device=x.device)
    if n == 0 or n_t == 0:
        return gates
    cfg = dense_config(x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(n_t, cfg.block_t))
    _gate_dense_fwd_kernel[grid](
        x, W, b, theta, gates, n, d, n_t, x.stride(0), W.stride(0),
        ACTIVATION=activation, DOT_FP32=_dot_fp32(x.dtype), BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return gates


def _forward_topk(
    x: Tensor, W: Tensor, b: Tensor, theta: Tensor, k: int, activation: str, split_t: int
) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    n_t = W.shape[0]
    gates = torch.empty(n, k, dtype=b.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if n == 0:
        return gates, indices
    cfg = fwd_config(k, x.dtype)
    if cfg is None:
        # k beyond the register budget: materialise the activations and select with PyTorch.
        acts = _forward_dense(x, W, b, theta, activation)
        indices = topk_lowest_index(acts, k)
        return acts.gather(1, indices), indices
    n_blocks = triton.cdiv(n, cfg.block_n)
    n_tiles = triton.cdiv(n_t, cfg.block_t)
    split = min(split_t or split_count(n_blocks, n_tiles, x.device), n_tiles)
    t_per_split = triton.cdiv(n_tiles, split) * cfg.block_t
    split = triton.cdiv(n_t, t_per_split)
    # Partial lists only exist with a split; without one the kernel never touches ``part``.
    part = torch.empty(split if split > 1 else 0, n, cfg.k_pad, dtype=torch.int64,
                       device=x.device)
    _gate_topk_fwd_kernel[(n_blocks, split)](
        x, W, b, theta, gates, indices, part, n, d, n_t, k, t_per_split, x.stride(0),
        W.stride(0), n * cfg.k_pad, ACTIVATION=activation, DOT_FP32=_dot_fp32(x.dtype),
        BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, K_PAD=cfg.k_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _gate_topk_merge_kernel[(triton.cdiv(n, MERGE_BLOCK_N),)](
            part, gates, indices, n, k, split, n * cfg.k_pad, BLOCK_N=MERGE_BLOCK_N,
            K_PAD=cfg.k_pad, num_warps=MERGE_NUM_WARPS,
        )
    if gates.dtype == torch.float64:
        # The keys ranked fp32-rounded values; the gates themselves are recomputed in fp64.
        _gate_pairs_fwd_kernel[(triton.cdiv(n * k, BWD.pair_block_p),)](
            x, W, b, theta, indices, gates, n * k, k, d, x.stride(0), W.stride(0),
            ACTIVATION=activation, BLOCK_P=BWD.pair_block_p, BLOCK_D=BWD.pair_block_d,
            num_warps=BWD.num_warps,
        )
    return gates, indices


def _backward_topk(
    dgates: Tensor, gates: Tensor, indices: Tensor, x: Tensor, W: Tensor, b: Tensor,
    theta: Tensor, activation: str, bandwidth: float, need_dx: bool, need_params: bool,
    threshold_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dW, db, d log_threshold) from the N*k selected pairs only; None where not asked for.

    dW and dx in W's and x's dtypes, db and d log_threshold in the gates' (fp32 or fp64).
    """
    n, k = indices.shape
    n_t, d = W.shape
    device = x.device
    n_pairs = n * k
    dpre = torch.empty(n_pairs, dtype=gates.dtype, device=device)
    dthr = torch.empty(n_pairs if threshold_grad else 0, dtype=gates.dtype, device=device)
    if n_pairs:
        _gate_pairs_bwd_kernel[(triton.cdiv(n_pairs, BWD.pair_block_p),)](
            x, W, b, theta, indices, gates, dgates, dpre, dthr, n_pairs, k, d, x.stride(0),
            W.stride(0), bandwidth, ACTIVATION=activation, THRESHOLD_GRAD=threshold_grad,
            BLOCK_P=BWD.pair_block_p, BLOCK_D=BWD.pair_block_d, num_warps=BWD.num_warps,
        )
    dx = None
    if need_dx:
        dx = torch.empty(n, d, dtype=x.dtype, device=device)
        if n:
            grid = (triton.cdiv(n, BWD.dx_block_n), triton.cdiv(d, BWD.dx_block_d))
            _gate_bwd_dx_kernel[grid](
                dpre, indices, W, dx, n, k, d, W.stride(0), dx.stride(0),
                BLOCK_N=BWD.dx_block_n, BLOCK_D=BWD.dx_block_d, num_warps=BWD.num_warps,
            )
    if not need_params:
        return dx, None, None, None
    dW = torch.zeros(n_t, d, dtype=W.dtype, device=device)
    db = torch.zeros(n_t, dtype=gates.dtype, device=device)
    dlog = torch.zeros(n_t if threshold_grad else 0, dtype=gates.dtype, device=device)
    if n_pairs:
        _reduce_by_transform(x, dpre, dthr, indices, dW, db, dlog, threshold_grad)
    return dx, dW, db, dlog if threshold_grad else None


def _reduce_by_transform(
    x: Tensor, dpre: Tensor, dthr: Tensor, indices: Tensor, dW: Tensor, db: Tensor,
    dlog: Tensor, threshold_grad: bool,
) -> None:
    """dW[t] = sum dpre * x, db[t] = sum dpre, dlog[t] = sum dthr over t's pairs (dW, db, dlog
    zero-filled), in the fixed pair order of route_pairs; no host synchronisation."""
    n, k = indices.shape
    n_t, d = dW.shape
    bm, group = BWD.dw_block_m, BWD.dw_group
    keep = dpre != 0
    if threshold_grad:
        keep |= dthr != 0
    routing = route_pairs(indices, keep.view(n, k), (n_t,), (bm,))
    n_blocks = (routing.pair_counts + bm - 1) // bm
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    n_chunks = (n_blocks + group - 1) // group
    hot = n_blocks > group
    chunk_sizes = torch.where(hot, n_chunks, 0)
    chunk_base = torch.cumsum(chunk_sizes, 0) - chunk_sizes
    # Shape-only bounds: a hot transform holds more than group * bm pairs.
    n_pairs = n * k
    max_hot = min(n_t, n_pairs // (group * bm + 1))
    max_chunks = n_pairs // (group * bm) + 2 * max_hot
    part = torch.empty(max_chunks, d, dtype=dpre.dtype, device=x.device)
    part_s = torch.empty(max_chunks, 2, dtype=dpre.dtype, device=x.device)
    total_blocks = routing.block_start[-1]
    if total_blocks:
        _gate_bwd_dw_kernel[(total_blocks,)](
            x, dpre, dthr, routing.pair_of_row, routing.transform_of_block, first_block,
            n_blocks, chunk_base, dW, db, dlog, part, part_s, k, d, x.stride(0), dW.stride(0),
            THRESHOLD_GRAD=threshold_grad, BLOCK_M=bm, BLOCK_D=BWD.dw_block_d, GROUP=group,
            num_warps=BWD.num_warps,
        )
    if max_hot:
        ids = torch.arange(n_t, device=x.device)
        hot_ids = torch.where(hot, ids, n_t).sort().values[:max_hot]
        hot_ids = torch.where(hot_ids < n_t, hot_ids, -1)
        _gate_bwd_dw_reduce_kernel[(max_hot,)](
            part, part_s, hot_ids, chunk_base, n_chunks, dW, db, dlog, d, dW.stride(0),
            THRESHOLD_GRAD=threshold_grad, BLOCK_D=BWD.dw_block_d, num_warps=BWD.num_warps,
        )


def _backward_dense(
    dgates: Tensor, gates: Tensor, x: Tensor, W: Tensor, b: Tensor, theta: Tensor,
    activation: str, bandwidth: float, need_dx: bool, need_params: bool, threshold_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Backward of k=None in PyTorch: its [N, T] gates exist already, so dense matmuls are the
    right tool. Same formulas as the sparse path."""
    acc = gates.dtype
    w = W.to(x.dtype).to(acc)  # the forward's products used W rounded to x's dtype
    dlog = None
    if activation == "relu":
        dpre = torch.where(gates > 0, dgates, 0.0)
    elif activation == "jumprelu":
        pre = gates
        if threshold_grad:
            pre = torch.where(gates != 0, gates, torch.addmm(b, x.to(acc), w.T))
            dlog = jumprelu_threshold_grad(dgates, pre, theta, bandwidth).sum(0)
        dpre = torch.where(pre > theta, dgates, 0.0)
    else:
        dpre = dgates
    dx = (dpre @ w).to(x.dtype) if need_dx else None
    if not need_params:
        return dx, None, None, None
    return dx, dpre.T @ x.to(acc), dpre.sum(0), dlog


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake implementations give shapes) with autograd.


def _prepare(
    x: Tensor, W: Tensor, b: Tensor, log_threshold: Tensor | None, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, W, b, theta as the kernels read them (see _kernel_weight); b and theta in the
    accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    b = b.to(acc).contiguous()
    return x.contiguous(), _kernel_weight(W, x.dtype), b, _theta(activation, log_threshold, acc, b)


@torch.library.custom_op("molt_kernels::gate_topk", mutates_args=())
def _gate_topk_op(
    x: Tensor, W_gate: Tensor, b_gate: Tensor, log_threshold: Tensor | None, k: int,
    activation: str, bandwidth: float, split_t: int,
) -> tuple[Tensor, Tensor]:
    x, W, b, theta = _prepare(x, W_gate, b_gate, log_threshold, activation)
    return _forward_topk(x, W, b, theta, k, activation, split_t)


@_gate_topk_op.register_fake
def _(x, W_gate, b_gate, log_threshold, k, activation, bandwidth, split_t):
    n = x.shape[0]
    return (x.new_empty((n, k), dtype=_acc_dtype(x.dtype)),
            x.new_empty((n, k), dtype=torch.int64))


@torch.library.custom_op("molt_kernels::gate_dense", mutates_args=())
def _gate_dense_op(
    x: Tensor, W_gate: Tensor, b_gate: Tensor, log_threshold: Tensor | None, activation: str,
    bandwidth: float,
) -> Tensor:
    x, W, b, theta = _prepare(x, W_gate, b_gate, log_threshold, activation)
    return _forward_dense(x, W, b, theta, activation)


@_gate_dense_op.register_fake
def _(x, W_gate, b_gate, log_threshold, activation, bandwidth):
    return x.new_empty((x.shape[0], W_gate.shape[0]), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("molt_kernels::gate_topk_backward", mutates_args=())
def _gate_backward_op(
    dgates: Tensor, gates: Tensor, indices: Tensor | None, x: Tensor, W_gate: Tensor,
    b_gate: Tensor, log_threshold: Tensor | None, activation: str, bandwidth: float,
    need_dx: bool, need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_gate, db_gate, d log_threshold), each in its input's dtype; an empty tensor for a
    gradient not asked for. ``indices=None``: the dense (k=None) gate."""
    threshold_grad = activation == "jumprelu" and need_params and log_threshold is not None
    xk, W, b, theta = _prepare(x, W_gate, b_gate, log_threshold, activation)
    dgates = dgates.contiguous()
    if indices is None:
        grads = _backward_dense(dgates, gates, xk, W, b, theta, activation, bandwidth, need_dx,
                                need_params, threshold_grad)
    else:
        grads = _backward_topk(dgates, gates, indices.contiguous(), xk, W, b, theta, activation,
                               bandwidth, need_dx, need_params, threshold_grad)
    like = (x, W_gate, b_gate, log_threshold)
    return tuple(
        g.to(ref.dtype) if g is not None else x.new_empty(0) for g, ref in zip(grads, like)
    )


@_gate_backward_op.register_fake
def _(dgates, gates, indices, x, W_gate, b_gate, log_threshold, activation, bandwidth, need_dx,
      need_params):
    threshold_grad = activation == "jumprelu" and need_params and log_threshold is not None
    wanted = (need_dx, need_params, need_params, threshold_grad)
    like = (x, W_gate, b_gate, log_threshold)
    return tuple(
        torch.empty_like(ref) if want else x.new_empty(0) for want, ref in zip(wanted, like)
    )


def _save(ctx, x, W_gate, b_gate, log_threshold, gates, indices, activation, bandwidth) -> None:
    ctx.save_for_backward(x, W_gate, b_gate, log_threshold, gates, indices)
    ctx.activation, ctx.bandwidth = activation, bandwidth


def _setup_topk(ctx, inputs, output) -> None:
    x, W_gate, b_gate, log_threshold, _k, activation, bandwidth, _split_t = inputs
    _save(ctx, x, W_gate, b_gate, log_threshold, *output, activation, bandwidth)


def _setup_dense(ctx, inputs, output) -> None:
    x, W_gate, b_gate, log_threshold, activation, bandwidth = inputs
    _save(ctx, x, W_gate, b_gate, log_threshold, output, None, activation, bandwidth)


def _backward(ctx, dgates: Tensor, *_):
    x, W_gate, b_gate, log_threshold, gates, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dW, db, dlog = _gate_backward_op(
        dgates, gates, indices, x, W_gate, b_gate, log_threshold, ctx.activation,
        ctx.bandwidth, need[0], any(need[1:4]),
    )
    grads = [g if want else None for g, want in zip((dx, dW, db, dlog), need[:4])]
    return (*grads, *[None] * (len(need) - 4))


_gate_topk_op.register_autograd(_backward, setup_context=_setup_topk)
_gate_dense_op.register_autograd(_backward, setup_context=_setup_dense)


# ----------------------------------------------------------------------------------------------
# Public entry


def gate_topk_triton(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str,
    log_threshold: Tensor | None,
    bandwidth: float,
    *,
    split_t: int | None = None,
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> gates [N, k] (fp32; fp64 for fp64 x), indices [N, k] int64, descending.

    W_gate [T, d_in] and b_gate [T] in any float dtype (fp32 parameters under half x are read
    as they are); log_threshold [T] for jumprelu. Ties go to the lower transform id. ``k=None``
    returns all T activations with indices 0..T-1. ``split_t`` forces the number of programs
    along T (None: chosen from the device).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "jumprelu":
        if log_threshold is None:
            raise ValueError("activation 'jumprelu' needs log_threshold [T]")
    else:
        log_threshold = None  # unused, so it gets no gradient
    n, n_t = x.shape[0], W_gate.shape[0]
    if k is None:
        gates = _gate_dense_op(x, W_gate, b_gate, log_threshold, activation, bandwidth)
        return gates, torch.arange(n_t, device=x.device).expand(n, n_t)
    if not 1 <= k <= n_t:
        raise ValueError(f"k must be in [1, T={n_t}] or None, got {k}")
    return _gate_topk_op(x, W_gate, b_gate, log_threshold, k, activation, bandwidth,
                         split_t or 0)


# ----------------------------------------------------------------------------------------------
# gpu-report registry


# (x, W) dtype pairs the launchers pass to the kernels: 16-bit inputs (fp16 compiles as bf16 does,
# with the same configs), fp32 parameters under 16-bit x (read and cast per tile), fp32, fp64.
_REPORT_DTYPES = (
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
)
_SIG_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _report_k_pads() -> list[int]:
    return [1 << i for i in range(MIN_K_PAD.bit_length() - 1, MAX_K_PAD.bit_length())]


def gpu_report_builds() -> list[KernelBuild]:
    """Every (kernel, config) the launchers above can choose, for molt_kernels.gpu_report.

    d_in, T and the row strides carry the ':16' hint the JIT specialises on in the common case
    (d_in, T multiples of 16), which is also the case that pipelines the d loop and so holds the
    most shared memory. Activations compile as jumprelu, the superset of the three.
    """
    builds: list[KernelBuild] = []
    for x_dtype, w_dtype in _REPORT_DTYPES:
        xs, ws = _SIG_NAME[x_dtype], _SIG_NAME[w_dtype]
        acc = _SIG_NAME[_acc_dtype(x_dtype)]
        tag = xs if x_dtype == w_dtype else f"{xs},W={ws}"
        tile = {"x_ptr": f"*{xs}", "w_ptr": f"*{ws}", "b_ptr": f"*{acc}", "theta_ptr": f"*{acc}",
                "gates_ptr": f"*{acc}", "N": "i32", "D": "i32:16", "T": "i32:16",
                "stride_xn": "i32:16", "stride_wt": "i32:16", "ACTIVATION": "constexpr",
                "DOT_FP32": "constexpr", "BLOCK_N": "constexpr", "BLOCK_T": "constexpr",
                "BLOCK_D": "constexpr"}
        for k_pad in _report_k_pads():
            cfg = fwd_config(k_pad, x_dtype)
            builds.append(KernelBuild(
                name="gate_topk_fwd", config=f"{tag},{cfg.label}", fn=_gate_topk_fwd_kernel,
                signature=tile | {"idx_ptr": "*i64", "part_ptr": "*i64", "K": "i32",
                                  "t_per_split": "i32:16", "stride_part": "i32",
                                  "K_PAD": "constexpr"},
                constexprs={"ACTIVATION": "jumprelu", "DOT_FP32": False,
                            "BLOCK_N": cfg.block_n, "BLOCK_T": cfg.block_t,
                            "BLOCK_D": cfg.block_d, "K_PAD": cfg.k_pad},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            ))
        dense = dense_config(x_dtype)
        builds.append(KernelBuild(
            name="gate_dense_fwd", config=f"{tag},{dense.label}", fn=_gate_dense_fwd_kernel,
            signature=tile,
            constexprs={"ACTIVATION": "jumprelu", "DOT_FP32": False,
                        "BLOCK_N": dense.block_n, "BLOCK_T": dense.block_t,
                        "BLOCK_D": dense.block_d},
            num_warps=dense.num_warps, num_stages=dense.num_stages,
        ))
        pairs = {"x_ptr": f"*{xs}", "w_ptr": f"*{ws}", "b_ptr": f"*{acc}",
                 "theta_ptr": f"*{acc}", "idx_ptr": "*i64", "gates_ptr": f"*{acc}", "P": "i32",
                 "K": "i32", "D": "i32:16", "stride_xn": "i32:16", "stride_wt": "i32:16",
                 "ACTIVATION": "constexpr", "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}
        pair_consts = {"ACTIVATION": "jumprelu", "BLOCK_P": BWD.pair_block_p,
                       "BLOCK_D": BWD.pair_block_d}
        bwd_label = f"{tag},BP={BWD.pair_block_p},BD={BWD.pair_block_d},w{BWD.num_warps}"
        if x_dtype == torch.float64:
            builds.append(KernelBuild(
                name="gate_pairs_fwd", config=bwd_label, fn=_gate_pairs_fwd_kernel,
                signature=pairs, constexprs=pair_consts, num_warps=BWD.num_warps,
            ))
        builds.append(KernelBuild(
            name="gate_pairs_bwd", config=bwd_label, fn=_gate_pairs_bwd_kernel,
            signature=pairs | {"dgates_ptr": f"*{acc}", "dpre_ptr": f"*{acc}",
                               "dthr_ptr": f"*{acc}", "bandwidth": "fp32",
                               "THRESHOLD_GRAD": "constexpr"},
            constexprs=pair_consts | {"THRESHOLD_GRAD": True}, num_warps=BWD.num_warps,
        ))
        builds.append(KernelBuild(
            name="gate_bwd_dx", config=f"{tag},BN={BWD.dx_block_n},BD={BWD.dx_block_d},"
            f"w{BWD.num_warps}", fn=_gate_bwd_dx_kernel,
            signature={"dpre_ptr": f"*{acc}", "idx_ptr": "*i64", "w_ptr": f"*{ws}",
                       "dx_ptr": f"*{xs}", "N": "i32", "K": "i32", "D": "i32:16",
                       "stride_wt": "i32:16", "stride_dxn": "i32:16", "BLOCK_N": "constexpr",
                       "BLOCK_D": "constexpr"},
            constexprs={"BLOCK_N": BWD.dx_block_n, "BLOCK_D": BWD.dx_block_d},
            num_warps=BWD.num_warps,
        ))
        dw_label = f"{tag},BM={BWD.dw_block_m},BD={BWD.dw_block_d},G={BWD.dw_group}," \
            f"w{BWD.num_warps}"
        builds.append(KernelBuild(
            name="gate_bwd_dw", config=dw_label, fn=_gate_bwd_dw_kernel,
            signature={"x_ptr": f"*{xs}", "dpre_ptr": f"*{acc}", "dthr_ptr": f"*{acc}",
                       "pair_of_row_ptr": "*i64", "transform_of_block_ptr": "*i64",
                       "first_block_ptr": "*i64", "n_blocks_ptr": "*i64",
                       "chunk_base_ptr": "*i64", "dw_ptr": f"*{ws}", "db_ptr": f"*{acc}",
                       "dthr_out_ptr": f"*{acc}", "part_ptr": f"*{acc}",
                       "part_s_ptr": f"*{acc}", "K": "i32", "D": "i32:16", "stride_xn": "i32:16",
                       "stride_dwt": "i32:16", "THRESHOLD_GRAD": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "GROUP": "constexpr"},
            constexprs={"THRESHOLD_GRAD": True, "BLOCK_M": BWD.dw_block_m,
                        "BLOCK_D": BWD.dw_block_d, "GROUP": BWD.dw_group},
            num_warps=BWD.num_warps,
        ))
    for acc in ("fp32", "fp64"):
        builds.append(KernelBuild(
            name="gate_bwd_dw_reduce", config=f"{acc},BD={BWD.dw_block_d},w{BWD.num_warps}",
            fn=_gate_bwd_dw_reduce_kernel,
            signature={"part_ptr": f"*{acc}", "part_s_ptr": f"*{acc}", "hot_ptr": "*i64",
                       "chunk_base_ptr": "*i64", "n_chunks_ptr": "*i64", "dw_ptr": f"*{acc}",
                       "db_ptr": f"*{acc}", "dthr_out_ptr": f"*{acc}", "D": "i32:16",
                       "stride_dwt": "i32:16", "THRESHOLD_GRAD": "constexpr",
                       "BLOCK_D": "constexpr"},
            constexprs={"THRESHOLD_GRAD": True, "BLOCK_D": BWD.dw_block_d},
            num_warps=BWD.num_warps,
        ))
    for acc in ("fp32", "fp64"):
        for k_pad in _report_k_pads():
            builds.append(KernelBuild(
                name="gate_topk_merge",
                config=f"{acc},K_PAD={k_pad},BN={MERGE_BLOCK_N},w{MERGE_NUM_WARPS}",
                fn=_gate_topk_merge_kernel,
                signature={"part_ptr": "*i64", "gates_ptr": f"*{acc}", "idx_ptr": "*i64",
                           "N": "i32", "K": "i32", "n_split": "i32", "stride_part": "i32",
                           "BLOCK_N": "constexpr", "K_PAD": "constexpr"},
                constexprs={"BLOCK_N": MERGE_BLOCK_N, "K_PAD": k_pad},
                num_warps=MERGE_NUM_WARPS,
            ))
    return builds
