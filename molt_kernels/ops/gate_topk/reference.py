"""Naive gate: dense logits, activation, full stable sort. The oracle for every gate backend."""

from __future__ import annotations

import torch
from torch import Tensor

from .activation import apply_activation
from .linear import gate_logits


def gate_topk_reference(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str,
    log_threshold: Tensor | None,
    bandwidth: float,
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> gates [N, k] (x's dtype), indices [N, k] int64; k=None keeps all T."""
    acts = apply_activation(gate_logits(x, W_gate, b_gate), activation, log_threshold, bandwidth)
    n, t = acts.shape
    if k is None:
        return acts, torch.arange(t, device=x.device).expand(n, t)
    # A stable descending sort keeps the lower transform id first among equal values.
    order = torch.sort(acts.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    return acts.gather(1, order), order
