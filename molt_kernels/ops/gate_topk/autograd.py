"""The triton gate as torch.library ops (opaque to torch.compile, fake kernels give shapes) with
registered autograd, and its entry point ``gate_topk_triton``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from ..batching import fold_into_tokens, loop_over_batch, unbatched
from ..dtypes import accumulator_dtype
from ..first_order import double_backward_error, first_order_only
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


# --- eager mode: the same ops behind a Function with torch.func support ------------------------


class _TritonGate(Function):
    """The triton gate in eager mode, differentiable under torch.func as well as autograd:
    ``jvp`` (forward mode), ``vmap`` (batch rules of ``ops.batching``) and a backward built from
    ``_TritonGateBackward``, which torch.func.jacrev can vmap.

    gates = act(pre)[selected], pre = x W^T + b: the selection is piecewise constant, so tangents
    flow through the selected values only, times act' (1 for identity; 1 where the gate is open
    for relu and jumprelu, whose threshold has no exact derivative, as in ``_JumpReLU``).
    """

    @staticmethod
    def forward(k, activation, bandwidth, split_t, allow_tf32, x, W_gate, b_gate, log_threshold):
        if k is None:
            gates = _gate_dense_op(x, W_gate, b_gate, log_threshold, activation, bandwidth,
                                   allow_tf32)  # fmt: skip
            n, n_t = gates.shape
            return gates, torch.arange(n_t, device=x.device).expand(n, n_t)
        return _gate_topk_op(x, W_gate, b_gate, log_threshold, k, activation, bandwidth, split_t,
                             allow_tf32)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        k, activation, bandwidth, _, _, x, W_gate, b_gate, log_threshold = inputs
        gates, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.activation, ctx.bandwidth, ctx.dense = activation, bandwidth, k is None
        ctx.save_for_backward(x, W_gate, b_gate, log_threshold, gates, indices)
        ctx.save_for_forward(x, W_gate, gates, indices)

    @staticmethod
    def backward(ctx, dgates: Tensor, _):
        x, W_gate, b_gate, log_threshold, gates, indices = ctx.saved_tensors
        need = ctx.needs_input_grad[5:9]
        grads = _TritonGateBackward.apply(
            ctx.activation, ctx.bandwidth, need[0], any(need[1:]), dgates, gates,
            None if ctx.dense else indices, x, W_gate, b_gate, log_threshold,
        )  # fmt: skip
        return (None,) * 5 + tuple(g if want else None for g, want in zip(grads, need))

    @staticmethod
    def jvp(ctx, _k, _act, _bw, _split, _tf32, x_t, W_t, b_t, _log_threshold_t):
        x, W_gate, gates, indices = ctx.saved_tensors
        dtype = gates.dtype
        pre_t = torch.zeros_like(gates)
        if x_t is not None:
            pre_t = pre_t + torch.einsum("nd,nkd->nk", x_t.to(dtype), W_gate.to(dtype)[indices])
        if W_t is not None:
            pre_t = pre_t + torch.einsum("nd,nkd->nk", x.to(dtype), W_t.to(dtype)[indices])
        if b_t is not None:
            pre_t = pre_t + b_t.to(dtype)[indices]
        if ctx.activation != "identity":
            pre_t = torch.where(gates != 0, pre_t, 0)
        return pre_t, None

    @staticmethod
    def vmap(info, in_dims, k, activation, bandwidth, split_t, allow_tf32, *tensors):
        def gate(x_, W_, b_, theta_):
            return _TritonGate.apply(k, activation, bandwidth, split_t, allow_tf32, x_, W_, b_,
                                     theta_)  # fmt: skip

        args, dims = tensors, in_dims[5:]
        if unbatched(dims, (1, 2, 3)):  # shared weights: one gate over B * N tokens
            return fold_into_tokens(info.batch_size, dims, gate, args, token_args=(0,))
        return loop_over_batch(info.batch_size, dims, gate, args)


class _TritonGateBackward(Function):
    """(dx, dW_gate, db_gate, d log_threshold) of ``_TritonGate`` (empty where not asked for).
    First-order only: differentiating it raises DoubleBackwardError. Its batch rule runs one
    backward per cotangent, which is how torch.func.jacrev uses it."""

    @staticmethod
    def forward(activation, bandwidth, need_dx, need_params, dgates, gates, indices, x, W_gate,
                b_gate, log_threshold):  # fmt: skip
        return _gate_backward_op(dgates, gates, indices, x, W_gate, b_gate, log_threshold,
                                 activation, bandwidth, need_dx, need_params)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *_):
        raise double_backward_error("gate_topk on the triton backend")

    @staticmethod
    def vmap(info, in_dims, activation, bandwidth, need_dx, need_params, dgates, *saved):
        if not unbatched(in_dims, range(5, len(in_dims))):
            raise NotImplementedError(
                "gate_topk on the triton backend: per-sample gradients (torch.func.vmap over "
                "grad/vjp with batched inputs) are not supported on any backend; loop over the "
                "samples"
            )

        def backward(dg):
            return _TritonGateBackward.forward(activation, bandwidth, need_dx, need_params, dg,
                                               *saved)  # fmt: skip

        return loop_over_batch(info.batch_size, in_dims[4:5], backward, (dgates,))


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

    Eager: ``_TritonGate`` (autograd, torch.func jacrev / jvp / vmap); under torch.compile, which
    traces no custom jvp or vmap, the torch.library ops and their registered autograd.
    """
    n, n_t = x.shape[0], W_gate.shape[0]
    check_gate_activation(activation, log_threshold)
    check_k(k, n_t)
    if activation != "jumprelu":
        log_threshold = None  # unused, so it gets no gradient
    if not torch.compiler.is_compiling():
        return _TritonGate.apply(k, activation, bandwidth, split_t or 0, allow_tf32, x, W_gate,
                                 b_gate, log_threshold)  # fmt: skip
    if k is None:
        gates = _gate_dense_op(x, W_gate, b_gate, log_threshold, activation, bandwidth,
                               allow_tf32)
        return gates, torch.arange(n_t, device=x.device).expand(n, n_t)
    return _gate_topk_op(x, W_gate, b_gate, log_threshold, k, activation, bandwidth,
                         split_t or 0, allow_tf32)
