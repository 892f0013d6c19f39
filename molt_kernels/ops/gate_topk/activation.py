"""Gate activations, shared by every backend so that all of them train the same thing.

jumprelu(pre; theta) = pre * H(pre - theta), theta = exp(log_threshold). Its threshold gradient is
the straight-through estimator of JumpReLU SAEs (Rajamanoharan et al., 2024) with a rectangle
kernel of bandwidth eps:  d out / d theta := -(theta / eps) * 1[|pre - theta| < eps / 2].
The gradient to ``pre`` is the exact one, H(pre - theta).
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "jumprelu", "identity")


def jumprelu_threshold_grad(
    grad_out: Tensor, pre: Tensor, theta: Tensor, bandwidth: float
) -> Tensor:
    """Per-element d loss / d log_threshold: grad_out * (-(theta/eps) * K) * theta."""
    window = (pre - theta).abs() < bandwidth / 2
    return torch.where(window, grad_out * (-theta * theta / bandwidth), torch.zeros_like(grad_out))


class _JumpReLU(torch.autograd.Function):
    # setup_context and an elementwise body: torch.func (jacrev, vmap, jvp) can transform it.
    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
        theta = log_threshold.exp().to(pre.dtype)
        return torch.where(pre > theta, pre, torch.zeros_like(pre))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pre, log_threshold, bandwidth = inputs
        theta = log_threshold.exp().to(pre.dtype)
        ctx.save_for_backward(pre, theta)
        ctx.save_for_forward(pre, theta)
        ctx.bandwidth = bandwidth

    @staticmethod
    def jvp(ctx, pre_tangent: Tensor, _log_threshold_tangent, _bandwidth_tangent) -> Tensor:
        # The exact derivative: the threshold's straight-through term is a backward-only
        # estimator, and d out / d pre = H(pre - theta).
        pre, theta = ctx.saved_tensors
        return torch.where(pre > theta, pre_tangent, torch.zeros_like(pre_tangent))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, theta = ctx.saved_tensors
        grad_pre = torch.where(pre > theta, grad_out, torch.zeros_like(grad_out))
        grad_log = None
        if ctx.needs_input_grad[1]:
            per_elem = jumprelu_threshold_grad(grad_out, pre, theta, ctx.bandwidth)
            grad_log = per_elem.reshape(-1, per_elem.shape[-1]).sum(0)
        return grad_pre, grad_log, None


def apply_activation(
    pre: Tensor, activation: str, log_threshold: Tensor | None, bandwidth: float
) -> Tensor:
    """act(pre) for pre [..., T]; ``log_threshold`` [T] is required for jumprelu."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "identity":
        return pre
    if activation == "jumprelu":
        if log_threshold is None:
            raise ValueError("activation 'jumprelu' needs log_threshold [T]")
        return _JumpReLU.apply(pre, log_threshold, bandwidth)
    raise ValueError(f"unknown activation {activation!r}")
