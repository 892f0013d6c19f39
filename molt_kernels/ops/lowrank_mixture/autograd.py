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

from ..configs import MixtureLayout, plan
from ..first_order import first_order_only
from ..routing import route_pairs
from . import cpu
from . import pytorch as torch_impl

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
    inputs: Sequence[Tensor], bias_dtype: DType,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, list, list]:
    """(dx, dgates, db, dU per bucket, dV per bucket), None where not needed; db in
    ``bias_dtype`` (b_dec's), summed in fp32 at least.

    ``backward(grad_y, (x, gates, U, V) flags)`` is the backend's primitive; it is first-order
    only, so under create_graph=True the gradients refuse a second backward (``inputs``: the
    op's differentiable inputs, see ``first_order_only``).
    """
    with no_grad():
        dx, dgates, dU, dV = backward(
            grad_y.contiguous(), (needs.x, needs.gates, needs.U, needs.V)
        )
        db = grad_y.sum(0, dtype=bias_dtype) if needs.b_dec else None
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
        """(y [N, d_out], *h_pre): the saved rank-space activations, whose sizes are data-dependent,
        are returned too so that torch.compile sees where their sizes come from (the extension's
        one flat h_pre, or the PyTorch decode's h_pre per bucket, [used blocks, BLOCK_M, r]).
        Their gradients are ignored."""
        U, V = weights[:n_buckets], weights[n_buckets:]
        ctx.n_buckets = n_buckets
        ctx.uses_extension = cpu.usable_for(x)
        if ctx.uses_extension:
            y, row_pair, t_offsets, h_pre = torch.ops.molt_kernels.lowrank_mixture_cpu(
                x, gates, indices, list(U), list(V), b_dec
            )
            ctx.save_for_backward(x, gates, *U, *V, row_pair, t_offsets, h_pre)
            h_pre = (h_pre,)
        else:
            bucket_sizes = tuple(v.shape[0] for v in V)
            block_m = torch_impl.block_sizes(x.shape[0], indices.shape[1], bucket_sizes)
            routing = route_pairs(indices, gates != 0, bucket_sizes, block_m)
            y, h_pre = torch_impl.forward(x, gates, routing, U, V, b_dec)
            ctx.routing = routing
            ctx.save_for_backward(x, gates, *U, *V, *h_pre)
        ctx.mark_non_differentiable(*h_pre)
        # h_pre never gets a gradient: do not fill one with zeros for backward.
        ctx.set_materialize_grads(False)
        return y, *h_pre

    @staticmethod
    def backward(ctx, grad_y, *_grad_h_pre):
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
            backward, grad_y, needs, nb, "torch", (x, gates, *U, *V), x.dtype
        )
        return (dx, dgates, None, db, None, *dU, *dV)


def _triton_layout(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: DType
) -> MixtureLayout:
    """Sizes of the triton backend's block table and h_pre, from shapes only."""
    return plan(n_tokens, n_slots, U, V, dtype).layout


def _table_shapes(n_tokens: int, n_slots: int, U, V, dtype: DType) -> tuple[tuple[int, ...], ...]:
    """Shapes of the BlockTable fields, in order, and of h_pre last."""
    lay = _triton_layout(n_tokens, n_slots, U, V, dtype)
    n_t = sum(v.shape[0] for v in V)
    return ((lay.n_rows,), (lay.n_blocks,), (lay.n_blocks + 1,), (n_t + 1,), (lay.n_blocks,),
            (lay.n_ranges + 1,), (lay.n_blocks,), (1,), (lay.h_size,))


@library.custom_op("molt_kernels::lowrank_mixture", mutates_args=())
def lowrank_mixture_triton(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: list[Tensor],
    V: list[Tensor],
    b_dec: Tensor,
    *,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The triton decode: (y [N, d_out], h_pre [h_size], the block table's tensors).

    x [N, d_in]; gates [N, S] fp32 (fp64 for fp64 x); indices [N, S] int64; U[b] [n_b, d_out, r_b]
    and V[b] [n_b, r_b, d_in] in x's dtype, or fp32 under half x (master weights, cast per tile in
    registers; each of U and V in one dtype); b_dec [d_out] in x's dtype or fp32. Gradients come
    back in each input's dtype, accumulated in fp32 (fp64 for fp64). ``allow_tf32``: fp32 dots in
    TF32, forward and backward. The block table is ``launch.BlockTable`` (int64); h_pre holds the
    ungated rank-space activations of every routed row, zero elsewhere. Every output is fully
    written. Deterministic (no atomics).
    """
    from . import launch as impl  # Triton is imported only when the triton backend runs

    y, table, h_pre = impl.forward(x, gates, indices, U, V, b_dec, allow_tf32)
    return y, h_pre, list(table)


@lowrank_mixture_triton.register_fake
def _(x, gates, indices, U, V, b_dec, *, allow_tf32=False):
    n_tokens, n_slots = indices.shape
    *table, h_shape = _table_shapes(n_tokens, n_slots, U, V, x.dtype)
    return (
        x.new_empty(n_tokens, U[0].shape[1]),
        x.new_empty(h_shape),
        [x.new_empty(shape, dtype=int64) for shape in table],
    )


@library.custom_op("molt_kernels::lowrank_mixture_backward", mutates_args=())
def lowrank_mixture_triton_backward(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    table: list[Tensor],
    U: list[Tensor],
    V: list[Tensor],
    h_pre: Tensor,
    need_x: bool,
    need_gates: bool,
    need_U: bool,
    need_V: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [N, d_in], dgates [N, S], dU, dV) of the triton decode, dU and dV flat over the
    buckets; gradients not asked for come back empty (an op returns tensors, never None)."""
    from . import launch as impl

    needs = (need_x, need_gates, need_U, need_V)
    grads = impl.backward(grad_y, x, gates, impl.BlockTable(*table), U, V, h_pre, needs,
                          allow_tf32)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@lowrank_mixture_triton_backward.register_fake
def _(grad_y, x, gates, table, U, V, h_pre, need_x, need_gates, need_U, need_V, allow_tf32):
    return (
        empty_like(x) if need_x else x.new_empty(0),
        empty_like(gates) if need_gates else gates.new_empty(0),
        U[0].new_empty(sum(u.numel() for u in U)) if need_U else x.new_empty(0),
        V[0].new_empty(sum(v.numel() for v in V)) if need_V else x.new_empty(0),
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    x, gates, _, U, V, b_dec = inputs
    _, h_pre, table = output
    ctx.mark_non_differentiable(h_pre, *table)
    ctx.set_materialize_grads(False)  # no zero gradients built for h_pre and the table
    ctx.n_buckets, ctx.n_table = len(U), len(table)
    ctx.allow_tf32, ctx.bias_dtype = keyword_only_inputs["allow_tf32"], b_dec.dtype
    ctx.needs = _Needs(
        x.requires_grad,
        gates.requires_grad,
        b_dec.requires_grad,
        any(u.requires_grad for u in U),
        any(v.requires_grad for v in V),
    )
    ctx.save_for_backward(x, gates, h_pre, *table, *U, *V)


def _split(flat: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
    """Views of a flat gradient as each bucket's weight shape."""
    sizes = [w.numel() for w in weights]
    return [g.view(w.shape) for g, w in zip(flat.split(sizes), weights)]


def _triton_backward(ctx, grad_y, *_aux_grads):
    nb, nt = ctx.n_buckets, ctx.n_table
    x, gates, h_pre, *rest = ctx.saved_tensors
    table, rest = rest[:nt], rest[nt:]
    U, V = rest[:nb], rest[nb:]

    def backward(gy: Tensor, flags: tuple[bool, bool, bool, bool]):
        dx, dg, dU, dV = lowrank_mixture_triton_backward(gy, x, gates, table, U, V, h_pre, *flags,
                                                         ctx.allow_tf32)
        return (dx if flags[0] else None, dg if flags[1] else None,
                _split(dU, U) if flags[2] else None, _split(dV, V) if flags[3] else None)

    dx, dgates, db, dU, dV = _gradients(
        backward, grad_y, ctx.needs, nb, "triton", (x, gates, *U, *V), ctx.bias_dtype
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
