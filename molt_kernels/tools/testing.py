"""Checking backends against the float64 naive reference; used by the tests and `verify`.

Policy (README.md, "Testing"): relative error ||out - ref|| / ||ref|| of the output and of every
gradient, against the reference run in float64 on the same parameters and input.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; 0 when both are zero, inf on a shape mismatch."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    num = (out - ref).norm().item()
    den = ref.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def forward_backward(
    layer: nn.Module, x: Tensor, backend: str, cotangent: Tensor
) -> dict[str, Tensor]:
    """Output, d x and every parameter gradient of <layer(x), cotangent> on ``backend``.

    Works on a copy, so the caller's layer and its gradients are untouched. A parameter that gets
    no gradient reports zeros (so a missing gradient still shows against a reference that has one).
    """
    layer = copy.deepcopy(layer)
    layer.backend = backend
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y * cotangent.to(device=y.device, dtype=y.dtype)).sum().backward()
    out = {"y": y.detach(), "x": x.grad}
    for name, p in layer.named_parameters():
        out[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def compare_to_reference(
    layer: nn.Module, x: Tensor, backend: str, dtype: torch.dtype, seed: int = 0
) -> dict[str, float]:
    """Relative errors of ``backend`` in ``dtype`` against the float64 reference, per tensor.

    ``layer`` and ``x`` are cast: the reference runs on their float64 copies, the backend on
    copies in ``dtype`` (parameters rounded first, so both see the same weights).
    """
    low = copy.deepcopy(layer).to(dtype)
    high = copy.deepcopy(low).to(torch.float64)
    x_low = x.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    d_out = layer.cfg.d_out
    # Rounded to dtype first so both runs differentiate the same cotangent.
    cotangent = torch.randn(*x.shape[:-1], d_out, generator=gen).to(dtype)
    ref = forward_backward(high, x_low.to(torch.float64), "reference", cotangent)
    got = forward_backward(low, x_low, backend, cotangent)
    return {name: relative_error(got[name], ref[name]) for name in ref}
