"""Launch code of the fused gate: buffers, grids and configs (from ``ops.configs``) per call."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..configs import (
    BWD,
    DENSE_GATE_BACKWARD_RATIO,
    MERGE_BLOCK_N,
    MERGE_NUM_WARPS,
    dense_config,
    fwd_config,
    split_count,
)
from ..dtypes import HALF, accumulator_dtype, dot_precision, kernel_weight_dtype
from ..routing import route_pairs
from ..runtime import triton_interpreting
from .activation import jumprelu_threshold_grad
from .kernels import (
    _gate_bwd_dw_kernel,
    _gate_bwd_dw_reduce_kernel,
    _gate_bwd_dx_kernel,
    _gate_dense_fwd_kernel,
    _gate_pairs_bwd_kernel,
    _gate_topk_fwd_kernel,
    _gate_topk_merge_kernel,
)
from .pytorch import topk_lowest_index


def _dot_fp32(x_dtype: torch.dtype) -> bool:
    # triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits in tl.dot; on the
    # GPU the tiles always go to the tensor cores in their own dtype.
    return x_dtype == torch.bfloat16 and triton_interpreting()


def _kernel_weight(W: Tensor, x_dtype: torch.dtype) -> Tensor:
    """W as the kernels read it (``kernel_weight_dtype``: fp32 under half x is read as it is and
    cast per tile), unit inner stride."""
    return W.to(kernel_weight_dtype(W.dtype, x_dtype)).contiguous()


def _theta(
    activation: str, log_threshold: Tensor | None, acc: torch.dtype, placeholder: Tensor
) -> Tensor:
    """theta = exp(log_threshold) computed in the accumulation dtype (fp32, fp64 for fp64 x),
    exactly the torch backend's. Without jumprelu the kernels never read it and get
    ``placeholder``."""
    if activation != "jumprelu":
        return placeholder
    return log_threshold.to(acc).exp().contiguous()


def _prepare(
    x: Tensor, W: Tensor, b: Tensor, log_threshold: Tensor | None, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, W, b, theta as the kernels read them (see _kernel_weight); b and theta in the
    accumulation dtype."""
    acc = accumulator_dtype(x.dtype)
    b = b.to(acc).contiguous()
    return x.contiguous(), _kernel_weight(W, x.dtype), b, _theta(activation, log_threshold, acc, b)


def _forward_dense(
    x: Tensor, W: Tensor, b: Tensor, theta: Tensor, activation: str, allow_tf32: bool
) -> Tensor:
    n, d = x.shape
    n_t = W.shape[0]
    gates = torch.empty(n, n_t, dtype=b.dtype, device=x.device)
    if n == 0 or n_t == 0:
        return gates
    cfg = dense_config(x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(n_t, cfg.block_t))
    _gate_dense_fwd_kernel[grid](
        x, W, b, theta, gates, n, d, n_t, x.stride(0), W.stride(0),
        ACTIVATION=activation, DOT_FP32=_dot_fp32(x.dtype),
        PRECISION=dot_precision(x.dtype, allow_tf32), BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return gates


def _forward_topk(
    x: Tensor, W: Tensor, b: Tensor, theta: Tensor, k: int, activation: str, split_t: int,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    n_t = W.shape[0]
    gates = torch.empty(n, k, dtype=b.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if n == 0:
        return gates, indices
    cfg = fwd_config(k, x.dtype)
    if cfg is None:
        # k beyond the register budget, or fp64 (exact ranking): materialise the activations and
        # select with PyTorch.
        acts = _forward_dense(x, W, b, theta, activation, allow_tf32)
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
        PRECISION=dot_precision(x.dtype, allow_tf32),
        BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, K_PAD=cfg.k_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _gate_topk_merge_kernel[(triton.cdiv(n, MERGE_BLOCK_N),)](
            part, gates, indices, n, k, split, n * cfg.k_pad, BLOCK_N=MERGE_BLOCK_N,
            K_PAD=cfg.k_pad, num_warps=MERGE_NUM_WARPS,
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
    if n_t <= DENSE_GATE_BACKWARD_RATIO * k:
        return _backward_scattered(dpre, dthr, indices, x, W, need_dx, need_params,
                                   threshold_grad)
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


def _backward_scattered(
    dpre: Tensor, dthr: Tensor, indices: Tensor, x: Tensor, W: Tensor, need_dx: bool,
    need_params: bool, threshold_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The dense GEMM pair over dpre scattered to [N, T] (see DENSE_GATE_BACKWARD_RATIO): the
    same formulas as the sparse kernels, deterministic (each token's indices are distinct)."""
    n, k = indices.shape
    n_t = W.shape[0]
    dense = torch.zeros(n, n_t, dtype=dpre.dtype, device=x.device)
    dense.scatter_(1, indices, dpre.view(n, k))
    dense_in = dense.to(_gemm_operand_dtype(x))
    magnitude = dense_in.abs()  # shared by both products' NaN containment
    dx = dlog = None
    if need_dx:
        # W as stored, as in _gate_bwd_dx_kernel (fp32 master weights are not copied in fp32).
        dx = _live_matmul(dense_in, magnitude, W, dense.dtype).to(x.dtype)
    if not need_params:
        return dx, None, None, None
    if threshold_grad:
        dlog = torch.zeros(n, n_t, dtype=dpre.dtype, device=x.device)
        dlog = dlog.scatter_(1, indices, dthr.view(n, k)).sum(0)
    dW = _live_matmul(dense_in.T, magnitude.T, x, dense.dtype)
    return dx, dW, dense.sum(0), dlog


def _gemm_operand_dtype(x: Tensor) -> torch.dtype:
    """Operand dtype of the gate backward's dense GEMM pair: x's own for half x on CUDA (tensor
    cores, fp32 accumulation and output: ``torch.mm(out_dtype=)``), else the accumulator's
    (the CPU computes half in fp32; fp32 and fp64 stay as they are)."""
    if x.dtype in HALF and x.device.type == "cuda":
        return x.dtype
    return accumulator_dtype(x.dtype)


def _live_matmul(a: Tensor, a_abs: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b in ``out_dtype`` with b cast to a's dtype, where a zero of ``a`` never meets a
    non-finite value of ``b`` (0 * NaN := 0), as in the sparse kernels, which read a token's x
    only for its live pairs; a live pair that meets one gives NaN. ``a_abs`` is ``a.abs()``.
    Sync-free (no data-dependent shapes), so the step stays capturable."""
    finite = b.isfinite()
    out = _matmul(a, torch.where(finite, b, 0), out_dtype)
    hits = _matmul(a_abs, torch.where(finite, 0.0, 1.0), out_dtype)
    return torch.where(hits > 0, float("nan"), out)


def _matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a [M, K] @ b [K, N] with b cast to a's dtype, accumulated and returned in ``out_dtype``
    (half a on CUDA: the tensor cores' fp32 accumulator, ``torch.mm(out_dtype=)``)."""
    b = b.to(a.dtype)
    return a @ b if a.dtype == out_dtype else torch.mm(a, b, out_dtype=out_dtype)


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
    dlog = None
    if activation == "relu":
        dpre = torch.where(gates <= 0, 0.0, dgates)  # NaN passes, as in torch.relu's backward
    elif activation == "jumprelu":
        pre = gates
        if threshold_grad:
            # pre recomputed as the forward formed it (W rounded to x's dtype), so the
            # straight-through window sees the forward's values.
            w_fwd = W.to(x.dtype).to(acc)
            pre = torch.where(gates != 0, gates, torch.addmm(b, x.to(acc), w_fwd.T))
            dlog = jumprelu_threshold_grad(dgates, pre, theta, bandwidth).sum(0)
        dpre = torch.where(pre > theta, dgates, 0.0)
    else:
        dpre = dgates
    dpre_in = dpre.to(_gemm_operand_dtype(x))  # half on CUDA: the tensor cores
    dx = _matmul(dpre_in, W, acc).to(x.dtype) if need_dx else None
    if not need_params:
        return dx, None, None, None
    return dx, _matmul(dpre_in.T, x, acc), dpre.sum(0), dlog
