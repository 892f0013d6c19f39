"""The MOLT decode: y = sum over active (token, t) of g_t * U_t (V_t x) + b_dec.

Backends side by side: ``reference.py`` (dense, masked; plain autograd), ``pytorch.py`` (sparse
over the routed block layout), ``kernels.py`` + ``launch.py`` (Triton); the sparse backends'
autograd lives in ``autograd.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .autograd import lowrank_mixture_torch, lowrank_mixture_triton
from .reference import lowrank_mixture_reference


def lowrank_mixture(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
    backend: str,
) -> Tensor:
    """y [N, d_out] for x [N, d_in], gates [N, k], indices [N, k] int64 on a resolved backend.

    All floating inputs must already share x's dtype (triton: gates fp32, fp64 for fp64 x);
    inputs are assumed validated (``molt_kernels.functional`` does that).
    """
    if backend == "reference":
        return lowrank_mixture_reference(x, gates, indices, U, V, b_dec)
    if backend == "torch":
        return lowrank_mixture_torch(x, gates, indices, U, V, b_dec)
    if backend == "triton":
        return lowrank_mixture_triton(x, gates, indices, list(U), list(V), b_dec)[0]
    raise ValueError(f"unknown backend {backend!r}")
