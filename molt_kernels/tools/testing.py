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


def _cotangent(layer: nn.Module, x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """The seeded cotangent of y, rounded to dtype so that every run differentiates the same."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*x.shape[:-1], layer.cfg.d_out, generator=gen).to(dtype)


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
    cotangent = _cotangent(layer, x, dtype, seed)
    ref = forward_backward(high, x_low.to(torch.float64), "reference", cotangent)
    got = forward_backward(low, x_low, backend, cotangent)
    return {name: relative_error(got[name], ref[name]) for name in ref}


# A backend may be this many unit roundoffs off per unit of a result's condition; the tolerance
# grows past TOLERANCE where that allows more. A bf16 kernel needs it: bf16's TOLERANCE is only 5
# roundoffs, and the triton decode rounds its rank-space activations to bf16 (fuzz seed 1126:
# dgates summed over tokens, condition 16, 5.2 roundoffs off). fp32 (168 roundoffs) is scaled
# only past condition 42.
ROUNDOFFS_PER_CONDITION = 4.0
# Never more than this, so that a check never becomes vacuous: a perturbation of a bf16 roundoff
# can flip a relu cut near zero that the backends, computing the gate in fp32 from the same
# rounded inputs, all make alike; a flipped selection moves a result by O(1).
MAX_TOLERANCE = 0.2
# Random perturbations per estimate; the largest response counts (one draw can miss a
# cancellation: with random signs, two cancelling terms move together half of the time).
CONDITION_SAMPLES = 3


def condition_numbers(
    layer: nn.Module, x: Tensor, dtype: torch.dtype, seed: int = 0
) -> dict[str, float]:
    """Per tensor of ``compare_to_reference``: how many of ``dtype``'s unit roundoffs u its result
    moves (relative, in the float64 reference) when x, every parameter and the cotangent are
    multiplied by 1 + u z (z standard normal, per element); the largest of CONDITION_SAMPLES draws.

    Every backend rounds its intermediates to about u, so this is the error floor of the problem
    itself: a gradient that is a sum with heavy cancellation (e.g. dx = gate term + decode term of
    opposite sign, or dW_gate summed over tokens of both signs) is this many times more sensitive
    than its inputs, on every backend and on the reference run in ``dtype`` alike.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    gen = torch.Generator().manual_seed(seed + 1)

    def perturbed(t: Tensor) -> Tensor:
        z = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return t * (1 + unit_roundoff * z)

    base = copy.deepcopy(layer).to(dtype).to(torch.float64)
    x_high = x.to(dtype).to(torch.float64)
    cotangent = _cotangent(layer, x, dtype, seed).to(torch.float64)
    ref = forward_backward(base, x_high, "reference", cotangent)
    worst = dict.fromkeys(ref, 0.0)
    for _ in range(CONDITION_SAMPLES):
        moved_layer = copy.deepcopy(base)
        with torch.no_grad():
            for p in moved_layer.parameters():
                p.copy_(perturbed(p))
        moved = forward_backward(moved_layer, perturbed(x_high), "reference", perturbed(cotangent))
        for name in ref:
            worst[name] = max(worst[name], relative_error(moved[name], ref[name]) / unit_roundoff)
    return worst


def tolerances(layer: nn.Module, x: Tensor, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Per tensor of ``compare_to_reference``: max(TOLERANCE[dtype], ROUNDOFFS_PER_CONDITION *
    condition * u) (``condition_numbers``), at most MAX_TOLERANCE."""
    base = TOLERANCE[dtype]
    allowed = ROUNDOFFS_PER_CONDITION * torch.finfo(dtype).eps / 2
    return {
        name: min(max(base, allowed * c), MAX_TOLERANCE)
        for name, c in condition_numbers(layer, x, dtype, seed).items()
    }
