"""Autograd of the MOLT decode, for the sparse backends (the reference uses plain autograd).

Backends: ``reference`` (dense, masked; plain autograd), ``torch`` (sparse over the routed block
layout) and ``triton`` (fused kernels). The sparse backends share one autograd: forward saves x,
the routing, the gates and the ungated rank-space activations h_pre; backward hands them to the
backend's backward primitive and adds the b_dec gradient (``_gradients``).

The triton backend is the torch.library op ``molt_kernels::lowrank_mixture`` (fake kernel and
``register_autograd``, so torch.compile traces it; its backward is the op
``molt_kernels::lowrank_mixture_backward``). Its h_pre and routing have shapes that follow from the
input shapes alone. The torch backend sizes h_pre by the rows actually used, which only the data
tells, so it runs as the autograd Function ``_SparseLowRankMixture`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, empty_like, int64, library, no_grad
from torch import dtype as DType
from torch.autograd import Function

from ..configs import plan
from ..first_order import first_order_only
from ..routing import Routing, region_starts, route_pairs
from . import cpu
from . import pytorch as torch_impl

# Routing tensors the triton op returns and its backward takes, in this order.
_ROUTING_FIELDS = ("pair_of_row", "row_of_pair", "transform_of_block", "blocks_used", "pair_counts")

BackwardFn = Callable[
    [Tensor, tuple[bool, bool, bool, bool]],
    tuple[Tensor | None, Tensor | None, Sequence[Tensor] | None, Sequence[Tensor] | None],
]


@dataclass(frozen=True)
class _Needs:
    """Which inputs of the decode want a gradient (U, V: any bucket's)."""

    x: bool
    gates: bool
    b_dec: bool
    U: bool
    V: bool


def _gradients(
    backward: BackwardFn, grad_y: Tensor, needs: _Needs, n_buckets: int, backend: str,
    inputs: Sequence[Tensor],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, list, list]:
    """(dx, dgates, db, dU per bucket, dV per bucket), None where not needed.

    ``backward(grad_y, (x, gates, U, V) flags)`` is the backend's primitive; it is first-order
    only, so under create_graph=True the gradients refuse a second backward (``inputs``: the
    op's differentiable inputs, see ``first_order_only``).
    """
    with no_grad():
        dx, dgates, dU, dV = backward(
            grad_y.contiguous(), (needs.x, needs.gates, needs.U, needs.V)
        )
        db = grad_y.sum(0) if needs.b_dec else None
    dU = list(dU) if dU is not None else [None] * n_buckets
    dV = list(dV) if dV is not None else [None] * n_buckets
    what = f"lowrank_mixture on the {backend} backend"
    dx, dgates, db, *dUV = first_order_only(what, [dx, dgates, db, *dU, *dV], inputs)
    return dx, dgates, db, dUV[:n_buckets], dUV[n_buckets:]


class _SparseLowRankMixture(Function):
    """Autograd of the torch backend: the C++ CPU decode (``cpu.py``) where it runs, else the
    PyTorch decode (``pytorch.py``)."""

    @staticmethod
    def forward(ctx, x, gates, indices, b_dec, n_buckets, *weights):
        """(y [N, d_out], h_pre): h_pre is the extension's saved rank-space activations (its length
        is data-dependent), returned so that torch.compile sees where its size comes from; empty on
        the PyTorch path. Both outputs' gradients other than y's are ignored."""
        U, V = weights[:n_buckets], weights[n_buckets:]
        ctx.n_buckets = n_buckets
        ctx.uses_extension = cpu.usable_for(x)
        if ctx.uses_extension:
            y, row_pair, t_offsets, h_pre = torch.ops.molt_kernels.lowrank_mixture_cpu(
                x, gates, indices, list(U), list(V), b_dec
            )
            ctx.save_for_backward(x, gates, *U, *V, row_pair, t_offsets, h_pre)
        else:
            bucket_sizes = tuple(v.shape[0] for v in V)
            block_m = torch_impl.block_sizes(x.shape[0], indices.shape[1], bucket_sizes)
            routing = route_pairs(indices, gates != 0, bucket_sizes, block_m)
            y, h_pre_per_bucket = torch_impl.forward(x, gates, routing, U, V, b_dec)
            ctx.routing = routing
            ctx.save_for_backward(x, gates, *U, *V, *h_pre_per_bucket)
            h_pre = x.new_empty(0)
        ctx.mark_non_differentiable(h_pre)
        # h_pre never gets a gradient: do not fill one with zeros for backward.
        ctx.set_materialize_grads(False)
        return y, h_pre

    @staticmethod
    def backward(ctx, grad_y, _grad_h_pre):
        nb = ctx.n_buckets
        if grad_y is None:  # y did not reach the loss
            return (None,) * (5 + 2 * nb)
        x, gates, *rest = ctx.saved_tensors
        U, V, state = rest[:nb], rest[nb : 2 * nb], rest[2 * nb :]
        need = ctx.needs_input_grad
        needs = _Needs(need[0], need[1], need[3], any(need[5 : 5 + nb]), any(need[5 + nb :]))

        def backward(gy: Tensor, flags: tuple[bool, bool, bool, bool]):
            if ctx.uses_extension:
                grads = torch.ops.molt_kernels.lowrank_mixture_cpu_backward(
                    gy, x, gates, *state[:2], list(U), list(V), state[2], *flags
                )
                return tuple(g if wanted else None for g, wanted in zip(grads, flags))
            return torch_impl.backward(gy, x, gates, ctx.routing, U, V, state, flags)

        dx, dgates, db, dU, dV = _gradients(
            backward, grad_y, needs, nb, "torch", (x, gates, *U, *V)
        )
        return (dx, dgates, None, db, None, *dU, *dV)


def _triton_layout(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: DType
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(block_m, block_start, row_start) the triton backend routes with, from shapes only."""
    block_m = tuple(c.block_m for c in plan(n_tokens, n_slots, U, V, dtype))
    block_start, row_start = region_starts(
        n_tokens, n_slots, [v.shape[0] for v in V], block_m
    )
    return block_m, block_start, row_start


@library.custom_op("molt_kernels::lowrank_mixture", mutates_args=())
def lowrank_mixture_triton(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: list[Tensor],
    V: list[Tensor],
    b_dec: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """The triton decode: (y [N, d_out], the routing's tensors, h_pre per bucket).

    x [N, d_in]; gates [N, k] fp32 (fp64 for fp64 x); indices [N, k] int64; U[b] [n_b, d_out, r_b],
    V[b] [n_b, r_b, d_in] and b_dec [d_out] in x's dtype. The routing tensors are those of
    ``ops.routing.Routing`` in ``_ROUTING_FIELDS`` order; h_pre[b] is [row capacity, r_b] in x's
    dtype, its rows past the bucket's used blocks left unwritten. Deterministic (no atomics).
    """
    from . import launch as impl  # Triton is imported only when the triton backend runs

    y, routing, h_pre = impl.forward(x, gates, indices, U, V, b_dec)
    return (y, *(getattr(routing, f) for f in _ROUTING_FIELDS), h_pre)


@lowrank_mixture_triton.register_fake
def _(x, gates, indices, U, V, b_dec):
    n_tokens, n_slots = indices.shape
    _, block_start, row_start = _triton_layout(n_tokens, n_slots, U, V, x.dtype)
    long = dict(dtype=int64, device=x.device)
    return (
        x.new_empty(n_tokens, U[0].shape[1]),
        x.new_empty(row_start[-1], **long),
        x.new_empty(n_tokens * n_slots, **long),
        x.new_empty(block_start[-1], **long),
        x.new_empty(len(V), **long),
        x.new_empty(sum(v.shape[0] for v in V), **long),
        [x.new_empty(row_start[b + 1] - row_start[b], v.shape[1]) for b, v in enumerate(V)],
    )


@library.custom_op("molt_kernels::lowrank_mixture_backward", mutates_args=())
def lowrank_mixture_triton_backward(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    routing: list[Tensor],
    U: list[Tensor],
    V: list[Tensor],
    h_pre: list[Tensor],
    need_x: bool,
    need_gates: bool,
    need_U: bool,
    need_V: bool,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(dx [N, d_in], dgates [N, k], dU, dV) of the triton decode; gradients not asked for come
    back as an empty tensor or list (an op returns tensors, never None)."""
    n_tokens, n_slots = gates.shape
    block_m, block_start, row_start = _triton_layout(n_tokens, n_slots, U, V, x.dtype)
    route = Routing(*routing, n_slots=n_slots, block_m=block_m, block_start=block_start,
                    row_start=row_start)
    needs = (need_x, need_gates, need_U, need_V)
    from . import launch as impl

    dx, dgates, dU, dV = impl.backward(grad_y, x, gates, route, U, V, h_pre, needs)
    return (
        dx if dx is not None else x.new_empty(0),
        dgates if dgates is not None else gates.new_empty(0),
        dU if dU is not None else [],
        dV if dV is not None else [],
    )


@lowrank_mixture_triton_backward.register_fake
def _(grad_y, x, gates, routing, U, V, h_pre, need_x, need_gates, need_U, need_V):
    return (
        empty_like(x) if need_x else x.new_empty(0),
        empty_like(gates) if need_gates else gates.new_empty(0),
        [empty_like(u) for u in U] if need_U else [],
        [empty_like(v) for v in V] if need_V else [],
    )


def _setup_context(ctx, inputs, output) -> None:
    x, gates, _, U, V, b_dec = inputs
    _, *routing, h_pre = output
    ctx.mark_non_differentiable(*h_pre)
    ctx.n_buckets = len(U)
    ctx.needs = _Needs(
        x.requires_grad,
        gates.requires_grad,
        b_dec.requires_grad,
        any(u.requires_grad for u in U),
        any(v.requires_grad for v in V),
    )
    ctx.save_for_backward(x, gates, *routing, *U, *V, *h_pre)


def _triton_backward(ctx, grad_y, *_aux_grads):
    nb, nr = ctx.n_buckets, len(_ROUTING_FIELDS)
    x, gates, *rest = ctx.saved_tensors
    routing, rest = rest[:nr], rest[nr:]
    U, V, h_pre = rest[:nb], rest[nb : 2 * nb], rest[2 * nb :]

    def backward(gy: Tensor, flags: tuple[bool, bool, bool, bool]):
        grads = lowrank_mixture_triton_backward(
            gy, x, gates, routing, U, V, h_pre, *flags
        )
        return tuple(g if need else None for g, need in zip(grads, flags))

    dx, dgates, db, dU, dV = _gradients(
        backward, grad_y, ctx.needs, nb, "triton", (x, gates, *U, *V)
    )
    return dx, dgates, None, dU, dV, db


lowrank_mixture_triton.register_autograd(_triton_backward, setup_context=_setup_context)


def lowrank_mixture_torch(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
) -> Tensor:
    """The torch backend's decode, differentiable (see ``_SparseLowRankMixture``)."""
    return _SparseLowRankMixture.apply(x, gates, indices, b_dec, len(U), *U, *V)[0]
