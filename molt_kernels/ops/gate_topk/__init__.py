"""Gated top-k: gates, indices = topk(act(x W_gate^T + b_gate)), ties to the lower transform id.

Backends: ``reference`` (dense logits, full stable sort), ``torch`` (dense logits, O(T) top-k;
autograd from PyTorch) and ``triton`` (fused kernel, logits never written to memory). Every
backend is a :data:`GateTopk`: ``(x [N, d_in], W_gate [T, d_in], b_gate [T], k, activation,
log_threshold [T] | None, bandwidth) -> (gates [N, k], indices [N, k] int64)``; ``k=None`` returns
all T activations with indices 0..T-1. Inputs are validated by ``layers.functional``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .pytorch import gate_topk_torch
from .reference import gate_topk_reference

GateTopk = Callable[
    [Tensor, Tensor, Tensor, "int | None", str, "Tensor | None", float], tuple[Tensor, Tensor]
]


def gate_topk_backend(backend: str, allow_tf32: bool = False) -> GateTopk:
    """The gate of a resolved backend name; ``allow_tf32`` lets the triton gate's fp32 dots use
    TF32 (the other backends' matmuls follow torch's own switch)."""
    if backend == "reference":
        return gate_topk_reference
    if backend == "torch":
        return gate_topk_torch
    if backend == "triton":
        from .autograd import gate_topk_triton  # Triton is imported only when it runs

        return functools.partial(gate_topk_triton, allow_tf32=allow_tf32)
    raise ValueError(f"unknown backend {backend!r}")
