"""The MOLT decode: y = sum over active (token, t) of g_t * U_t (V_t x) + b_dec.

Backends: ``reference`` (dense, masked; plain autograd), ``torch`` (sparse over the routed block
layout) and ``triton`` (fused kernels). The sparse backends share the autograd below: forward saves
x, the routing, the gates and the ungated rank-space activations h_pre; backward hands them to the
backend's backward primitive.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from torch import Tensor
from torch.autograd import Function

from ..routing import route_pairs

# The sibling module is named torch.py (one file per backend); this package never binds the name
# ``torch`` itself, so the import below cannot be shadowed by, or shadow, the library.
from . import torch as torch_impl
from .reference import lowrank_mixture_reference


class _SparseLowRankMixture(Function):
    @staticmethod
    def forward(ctx, impl: ModuleType, x, gates, indices, b_dec, n_buckets, *weights):
        U, V = weights[:n_buckets], weights[n_buckets:]
        bucket_sizes = tuple(v.shape[0] for v in V)
        block_m = impl.block_sizes(x.shape[0], indices.shape[1], bucket_sizes)
        routing = route_pairs(indices, gates != 0, bucket_sizes, block_m)
        y, h_pre = impl.forward(x, gates, routing, U, V, b_dec)
        ctx.impl, ctx.routing, ctx.n_buckets = impl, routing, n_buckets
        ctx.save_for_backward(x, gates, *U, *V, *h_pre)
        ctx.mark_non_differentiable(indices)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        nb = ctx.n_buckets
        x, gates, *rest = ctx.saved_tensors
        U, V, h_pre = rest[:nb], rest[nb : 2 * nb], rest[2 * nb :]
        need = ctx.needs_input_grad
        needs = (need[1], need[2], any(need[6 : 6 + nb]), any(need[6 + nb :]))
        dx, dgates, dU, dV = ctx.impl.backward(
            grad_y.contiguous(), x, gates, ctx.routing, U, V, h_pre, needs
        )
        db = grad_y.sum(0) if need[4] else None
        dU = dU if dU is not None else [None] * nb
        dV = dV if dV is not None else [None] * nb
        return (None, dx, dgates, None, db, None, *dU, *dV)


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

    All floating inputs must already share x's dtype; inputs are assumed validated
    (``molt_kernels.functional`` does that).
    """
    if backend == "reference":
        return lowrank_mixture_reference(x, gates, indices, U, V, b_dec)
    if backend == "torch":
        impl = torch_impl
    elif backend == "triton":
        from . import triton as impl
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return _SparseLowRankMixture.apply(impl, x, gates, indices, b_dec, len(U), *U, *V)
