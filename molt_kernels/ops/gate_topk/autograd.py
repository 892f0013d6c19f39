"""The triton gate as torch.library ops (opaque to torch.compile, fake kernels give shapes) with
registered autograd, and its entry point ``gate_topk_triton``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dtypes import accumulator_dtype
from ..first_order import first_order_only
from ..validation import check_gate_activation, check_k
from .launch import _backward_dense, _backward_topk, _forward_dense, _forward_topk, _prepare


@torch.library.custom_op("molt_kernels::gate_topk", mutates_args=())
def _gate_topk_op(
    x: Tensor, W_gate: Tensor, b_gate: Tensor, log_threshold: Tensor | None, k: int,
    activation: str, bandwidth: float, split_t: int, allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    x, W, b, theta = _prepare(x, W_gate, b_gate, log_threshold, activation)
    return _forward_topk(x, W, b, theta, k, activation, split_t, allow_tf32)


@_gate_topk_op.register_fake
def _(x, W_gate, b_gate, log_threshold, k, activation, bandwidth, split_t, allow_tf32):
    n = x.shape[0]
    return (x.new_empty((n, k), dtype=accumulator_dtype(x.dtype)),
            x.new_empty((n, k), dtype=torch.int64))


@torch.library.custom_op("molt_kernels::gate_dense", mutates_args=())
def _gate_dense_op(
    x: Tensor, W_gate: Tensor, b_gate: Tensor, log_threshold: Tensor | None, activation: str,
    bandwidth: float, allow_tf32: bool,
) -> Tensor:
    x, W, b, theta = _prepare(x, W_gate, b_gate, log_threshold, activation)
    return _forward_dense(x, W, b, theta, activation, allow_tf32)


@_gate_dense_op.register_fake
def _(x, W_gate, b_gate, log_threshold, activation, bandwidth, allow_tf32):
    return x.new_empty((x.shape[0], W_gate.shape[0]), dtype=accumulator_dtype(x.dtype))


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
    x, W_gate, b_gate, log_threshold, _k, activation, bandwidth, _split_t, _tf32 = inputs
    _save(ctx, x, W_gate, b_gate, log_threshold, *output, activation, bandwidth)


def _setup_dense(ctx, inputs, output) -> None:
    x, W_gate, b_gate, log_threshold, activation, bandwidth, _tf32 = inputs
    _save(ctx, x, W_gate, b_gate, log_threshold, output, None, activation, bandwidth)


def _backward(ctx, dgates: Tensor, *_):
    x, W_gate, b_gate, log_threshold, gates, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    with torch.no_grad():
        dx, dW, db, dlog = _gate_backward_op(
            dgates, gates, indices, x, W_gate, b_gate, log_threshold, ctx.activation,
            ctx.bandwidth, need[0], any(need[1:4]),
        )
    grads = [g if want else None for g, want in zip((dx, dW, db, dlog), need[:4])]
    grads = first_order_only("gate_topk on the triton backend", grads,
                             (x, W_gate, b_gate, log_threshold))
    return (*grads, *[None] * (len(need) - 4))


_gate_topk_op.register_autograd(_backward, setup_context=_setup_topk)
_gate_dense_op.register_autograd(_backward, setup_context=_setup_dense)


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
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> gates [N, k] (fp32; fp64 for fp64 x), indices [N, k] int64, descending.

    W_gate [T, d_in] and b_gate [T] in any float dtype (fp32 parameters under half x are read
    as they are); log_threshold [T] for jumprelu. Ties go to the lower transform id. ``k=None``
    returns all T activations with indices 0..T-1. ``split_t`` forces the number of programs
    along T (None: chosen from the device). ``allow_tf32``: fp32 x @ W_gate^T in TF32 (the
    backward's sparse kernels multiply on the FMA units in fp32; its dense GEMM pair is torch
    matmuls under torch's own switch).
    """
    n, n_t = x.shape[0], W_gate.shape[0]
    check_gate_activation(activation, log_threshold)
    check_k(k, n_t)
    if activation != "jumprelu":
        log_threshold = None  # unused, so it gets no gradient
    if k is None:
        gates = _gate_dense_op(x, W_gate, b_gate, log_threshold, activation, bandwidth,
                               allow_tf32)
        return gates, torch.arange(n_t, device=x.device).expand(n, n_t)
    return _gate_topk_op(x, W_gate, b_gate, log_threshold, k, activation, bandwidth,
                         split_t or 0, allow_tf32)
