"""The gate's logits x W^T + b for the dense gate backends, with gradients that keep a non-finite
token row (or weight row) contained.

A dense backward multiplies every structural zero of d pre (unselected transforms, relu/jumprelu
cut gates) by the whole of x and W: one NaN token would make every row of dW_gate NaN, and one NaN
weight row every token's dx. The fused triton gate reads x and W only for pairs with d pre != 0;
this Function gives the dense backends the same rule: a pair with d pre == 0 contributes nothing,
exactly, even against NaN/Inf. Clean inputs take plain matmuls (one isfinite check each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function


def _bad_rows(t: Tensor) -> Tensor:
    """Indices of the rows of ``t`` [M, D] holding a NaN or Inf.

    A non-finite value makes the sum non-finite, so a finite sum (one read of ``t``) proves every
    row clean; only a non-finite sum (a bad value, or an overflow of finite ones) pays for the
    per-element check, which is several passes over ``t`` (x here: [tokens, d_in]).
    """
    if t.sum().isfinite():
        return t.new_empty(0, dtype=torch.int64)
    return (~t.isfinite().all(1)).nonzero()[:, 0]


def _contained_matmul(dpre: Tensor, other: Tensor) -> Tensor:
    """dpre [..., M, K] @ other [K, D] where rows of ``other`` with non-finite values contribute
    only through the non-zero entries of dpre's matching column (0 * NaN := 0)."""
    bad = _bad_rows(other)
    if bad.numel() == 0:
        return dpre @ other
    out = dpre @ torch.where(other.isfinite().all(1, keepdim=True), other, 0)
    d_bad = dpre[..., bad]  # [..., M, n_bad]
    terms = d_bad[..., None] * other[bad]  # [..., M, n_bad, D]
    return out + torch.where((d_bad != 0)[..., None], terms, 0).sum(-2)


class _ContainedLinear(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        return F.linear(x, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, W, _ = inputs
        ctx.save_for_backward(x, W)
        ctx.save_for_forward(x, W)

    @staticmethod
    def backward(ctx, dpre: Tensor):
        x, W = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad
        dx = _contained_matmul(dpre, W) if need_x else None
        dW = _contained_matmul(dpre.transpose(-1, -2), x) if need_W else None
        db = dpre.sum(-2) if need_b else None
        return dx, dW, db

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, W_t: Tensor | None, b_t: Tensor | None) -> Tensor:
        x, W = ctx.saved_tensors
        out = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
        if x_t is not None:
            out = out + x_t @ W.T
        if W_t is not None:
            out = out + x @ W_t.T
        if b_t is not None:
            out = out + b_t
        return out


def gate_logits(x: Tensor, W_gate: Tensor, b_gate: Tensor) -> Tensor:
    """pre [N, T] = x [N, d_in] W_gate^T + b_gate, its gradients contained (see module doc).

    Under torch.compile the plain product: Dynamo traces neither a custom jvp nor the backward's
    data-dependent row check, so NaN containment of the gate's gradients is an eager-mode promise.
    """
    if torch.compiler.is_compiling():
        return F.linear(x, W_gate, b_gate)
    return _ContainedLinear.apply(x, W_gate, b_gate)
