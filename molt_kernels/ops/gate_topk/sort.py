"""Packed (value, transform id) keys and bitonic sorting networks on them, for the fused gate.

A key is one int64: the order-preserving bits of the fp32 value above, ``IDX_BASE - t``
below, so one signed integer order ranks by value and then by the lower transform id.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Packed keys store IDX_BASE - t in their low 32 bits, so among equal values the lower id is larger.
IDX_BASE = tl.constexpr(2**31 - 1)
KEY_MIN = tl.constexpr(-(2**63))


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
