"""Gated top-k: gates, indices = topk(act(x W_gate^T + b_gate)), ties to the lower transform id.

Backends: ``reference`` (dense logits, full stable sort), ``torch`` (dense logits, O(T) top-k;
autograd from PyTorch) and ``triton`` (fused kernel, logits never written to memory).
"""

from __future__ import annotations

from torch import Tensor

from .pytorch import gate_topk_torch
from .reference import gate_topk_reference


def gate_topk(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str,
    log_threshold: Tensor | None,
    bandwidth: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> (gates [N, k] in x's dtype, indices [N, k] int64) on a resolved backend.

    ``k=None`` returns all T activations with indices 0..T-1. Inputs are assumed validated.
    """
    if backend == "reference":
        impl = gate_topk_reference
    elif backend == "torch":
        impl = gate_topk_torch
    elif backend == "triton":
        from .autograd import gate_topk_triton as impl
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return impl(x, W_gate, b_gate, k, activation, log_threshold, bandwidth)
