"""The MOLT decode: y = sum over active (token, t) of g_t * U_t (V_t x) + b_dec.

Backends side by side: ``reference.py`` (dense, masked; plain autograd), ``pytorch.py`` (sparse
over the routed block layout), ``kernels.py`` + ``launch.py`` (Triton); the sparse backends'
autograd lives in ``autograd.py``. Every backend is a :data:`LowrankMixture`: ``(x [N, d_in],
gates [N, k], indices [N, k] int64, U, V, b_dec) -> y [N, d_out]`` with U[b] [n_b, d_out, r_b],
V[b] [n_b, r_b, d_in]. Floating inputs share x's dtype (triton: gates fp32, fp64 for fp64 x, and
fp32 weights under half x, see ``dtypes.kernel_weight_dtype``); inputs are validated by
``layers.functional``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import Tensor

from .autograd import lowrank_mixture_triton, sparse_lowrank_mixture
from .reference import lowrank_mixture_reference

LowrankMixture = Callable[
    [Tensor, Tensor, Tensor, Sequence[Tensor], Sequence[Tensor], Tensor], Tensor
]


def lowrank_mixture_backend(
    backend: str, allow_tf32: bool = False, deterministic: bool = True
) -> LowrankMixture:
    """The decode of a resolved backend name; ``allow_tf32`` lets the triton decode's fp32 dots
    use TF32 (the other backends' matmuls follow torch's own switch); ``deterministic=False``
    opts the triton decode into its fp32 atomic combine (the others are deterministic)."""
    if backend == "reference":
        return lowrank_mixture_reference
    if backend in ("torch", "triton"):
        return functools.partial(sparse_lowrank_mixture, backend, allow_tf32=allow_tf32,
                                 deterministic=deterministic)
    raise ValueError(f"unknown backend {backend!r}")


__all__ = [
    "LowrankMixture",
    "lowrank_mixture_backend",
    "lowrank_mixture_reference",
    "lowrank_mixture_triton",  # the torch.library op (opcheck, compile tests)
    "sparse_lowrank_mixture",
]
