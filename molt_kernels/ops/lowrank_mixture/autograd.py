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

from ..batching import fold_into_tokens, loop_over_batch, unbatched
from ..configs import MixtureLayout, default_combine, plan
from ..first_order import double_backward_error, first_order_only
from ..routing import Routing, route_pairs
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


def _torch_forward(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...], Routing | None, tuple[Tensor, ...]]:
    """The torch backend's forward: (y, the saved rank-space activations (the extension's flat
    h_pre, or the PyTorch decode's per bucket), the routing (None on the extension), the tensors
    its backward needs)."""
    if cpu.usable_for(x):
        y, row_pair, t_offsets, h_pre = torch.ops.molt_kernels.lowrank_mixture_cpu(
            x, gates, indices, list(U), list(V), b_dec
        )
        return y, (h_pre,), None, (row_pair, t_offsets, h_pre)
    bucket_sizes = tuple(v.shape[0] for v in V)
    block_m = torch_impl.block_sizes(x.shape[0], indices.shape[1], bucket_sizes)
    routing = route_pairs(indices, gates != 0, bucket_sizes, block_m)
    y, h_pre_per_bucket = torch_impl.forward(x, gates, routing, U, V, b_dec)
    return y, tuple(h_pre_per_bucket), routing, tuple(h_pre_per_bucket)


def _torch_backward(
    routing: Routing | None,
    state: Sequence[Tensor],
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    flags: tuple[bool, bool, bool, bool],
):
    """(dx, dgates, dU, dV) of ``_torch_forward``, None where its flag is off."""
    if routing is None:  # the extension
        row_pair, t_offsets, h_pre = state
        grads = torch.ops.molt_kernels.lowrank_mixture_cpu_backward(
            grad_y, x, gates, row_pair, t_offsets, list(U), list(V), h_pre, *flags
        )
        return tuple(g if wanted else None for g, wanted in zip(grads, flags))
    return torch_impl.backward(grad_y, x, gates, routing, U, V, state, flags)


class _SparseLowRankMixture(Function):
    """Autograd of the torch backend under torch.compile: the C++ CPU decode (``cpu.py``) where
    it runs, else the PyTorch decode (``pytorch.py``)."""

    @staticmethod
    def forward(ctx, x, gates, indices, b_dec, n_buckets, *weights):
        """(y [N, d_out], *h_pre): the saved rank-space activations, whose sizes are data-dependent,
        are returned too so that torch.compile sees where their sizes come from (the extension's
        one flat h_pre, or the PyTorch decode's h_pre per bucket, [used blocks, BLOCK_M, r]).
        Their gradients are ignored."""
        U, V = weights[:n_buckets], weights[n_buckets:]
        ctx.n_buckets = n_buckets
        y, h_pre, ctx.routing, state = _torch_forward(x, gates, indices, U, V, b_dec)
        ctx.save_for_backward(x, gates, *U, *V, *state)
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
            return _torch_backward(ctx.routing, state, gy, x, gates, U, V, flags)

        dx, dgates, db, dU, dV = _gradients(
            backward, grad_y, needs, nb, "torch", (x, gates, *U, *V), x.dtype
        )
        return (dx, dgates, None, db, None, *dU, *dV)


def _triton_layout(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: DType,
    deterministic: bool = True,
) -> MixtureLayout:
    """Sizes of the triton backend's block table and h_pre, from shapes only."""
    return plan(n_tokens, n_slots, U, V, dtype, default_combine(dtype, deterministic)).layout


def _table_shapes(
    n_tokens: int, n_slots: int, U, V, dtype: DType, deterministic: bool
) -> tuple[tuple[int, ...], ...]:
    """Shapes of the BlockTable fields, in order, and of h_pre last."""
    lay = _triton_layout(n_tokens, n_slots, U, V, dtype, deterministic)
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
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The triton decode: (y [N, d_out], h_pre [h_size], the block table's tensors).

    x [N, d_in]; gates [N, S] fp32 (fp64 for fp64 x); indices [N, S] int64; U[b] [n_b, d_out, r_b]
    and V[b] [n_b, r_b, d_in] in x's dtype, or fp32 under half x (master weights, cast per tile in
    registers; each of U and V in one dtype); b_dec [d_out] in x's dtype or fp32. Gradients come
    back in each input's dtype, accumulated in fp32 (fp64 for fp64). ``allow_tf32``: fp32 dots in
    TF32, forward and backward. The block table is ``launch.BlockTable`` (int64); h_pre holds the
    ungated rank-space activations of every routed row, zero elsewhere. Every output is fully
    written. Bitwise deterministic unless ``deterministic=False`` opts y and dx into the fp32
    atomic combine (``configs.COMBINES``: run-to-run rounding differences).
    """
    from . import launch as impl  # Triton is imported only when the triton backend runs

    y, table, h_pre = impl.forward(x, gates, indices, U, V, b_dec, allow_tf32,
                                   deterministic=deterministic)
    return y, h_pre, list(table)


@lowrank_mixture_triton.register_fake
def _(x, gates, indices, U, V, b_dec, *, allow_tf32=False, deterministic=True):
    n_tokens, n_slots = indices.shape
    *table, h_shape = _table_shapes(n_tokens, n_slots, U, V, x.dtype, deterministic)
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
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [N, d_in], dgates [N, S], dU, dV) of the triton decode, dU and dV flat over the
    buckets; gradients not asked for come back empty (an op returns tensors, never None)."""
    from . import launch as impl

    needs = (need_x, need_gates, need_U, need_V)
    grads = impl.backward(grad_y, x, gates, impl.BlockTable(*table), U, V, h_pre, needs,
                          allow_tf32, deterministic=deterministic)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@lowrank_mixture_triton_backward.register_fake
def _(grad_y, x, gates, table, U, V, h_pre, need_x, need_gates, need_U, need_V, allow_tf32,
      deterministic):
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
    ctx.deterministic = keyword_only_inputs["deterministic"]
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
        state = (h_pre, table, ctx.allow_tf32, ctx.deterministic)
        return _triton_backward_grads(state, gy, x, gates, U, V, flags)

    dx, dgates, db, dU, dV = _gradients(
        backward, grad_y, ctx.needs, nb, "triton", (x, gates, *U, *V), ctx.bias_dtype
    )
    return dx, dgates, None, dU, dV, db


lowrank_mixture_triton.register_autograd(_triton_backward, setup_context=_setup_context)


# --- eager mode: one Function over both sparse backends, with torch.func support -------------


def _triton_forward(x, gates, indices, U, V, b_dec, allow_tf32, deterministic):
    y, h_pre, table = lowrank_mixture_triton(
        x, gates, indices, list(U), list(V), b_dec, allow_tf32=allow_tf32,
        deterministic=deterministic,
    )
    return y, (h_pre, table, allow_tf32, deterministic)


def _triton_backward_grads(state, grad_y, x, gates, U, V, flags):
    h_pre, table, allow_tf32, deterministic = state
    dx, dg, dU, dV = lowrank_mixture_triton_backward(
        grad_y, x, gates, table, U, V, h_pre, *flags, allow_tf32, deterministic
    )
    return (
        dx if flags[0] else None,
        dg if flags[1] else None,
        _split(dU, U) if flags[2] else None,
        _split(dV, V) if flags[3] else None,
    )


def _torch_forward_state(x, gates, indices, U, V, b_dec, allow_tf32, deterministic):
    # The torch backend's matmuls follow torch's own TF32 switch; it is always deterministic.
    y, _, routing, state = _torch_forward(x, gates, indices, U, V, b_dec)
    return y, (routing, state)


def _torch_backward_grads(state, grad_y, x, gates, U, V, flags):
    return _torch_backward(*state, grad_y, x, gates, U, V, flags)


# backend -> (forward(x, gates, indices, U, V, b_dec, allow_tf32, deterministic) -> (y, state),
#             backward(state, grad_y, x, gates, U, V, flags) -> (dx, dgates, dU, dV))
_PRIMITIVES = {
    "torch": (_torch_forward_state, _torch_backward_grads),
    "triton": (_triton_forward, _triton_backward_grads),
}


class _Stash:
    """Carries a forward's routing and rank-space activations to its setup_context, which sees
    only inputs and outputs (torch.func's Function protocol)."""

    state: object = None


def _per_sample_gradients_error(backend: str) -> NotImplementedError:
    return NotImplementedError(
        f"lowrank_mixture on the {backend} backend: per-sample gradients (torch.func.vmap over "
        "grad/vjp with batched inputs) are not supported on any backend; loop over the "
        "samples"
    )


class _SparseMixture(Function):
    """The sparse decode in eager mode, differentiable under torch.func as well as autograd:
    ``jvp`` (forward mode), ``vmap`` (batch rules of ``ops.batching``) and a backward built from
    ``_SparseMixtureBackward``, which torch.func.jacrev can vmap.

    The decode y = b + sum_pairs g U_t (V_t x) is linear in each of x, gates, U and V, so its
    tangent is a sum of decodes with one argument replaced by its tangent (zero bias).
    """

    @staticmethod
    def forward(spec, stash, x, gates, indices, b_dec, n_buckets, *weights):
        """``spec``: (backend, allow_tf32, deterministic)."""
        backend, allow_tf32, deterministic = spec
        U, V = weights[:n_buckets], weights[n_buckets:]
        y, stash.state = _PRIMITIVES[backend][0](x, gates, indices, U, V, b_dec, allow_tf32,
                                                 deterministic)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        spec, stash, x, gates, indices, b_dec, n_buckets, *weights = inputs
        ctx.spec, ctx.n_buckets, ctx.state = spec, n_buckets, stash.state
        ctx.bias_dtype = b_dec.dtype
        ctx.save_for_backward(x, gates, *weights)
        ctx.save_for_forward(x, gates, indices, *weights)

    @staticmethod
    def backward(ctx, grad_y):
        nb = ctx.n_buckets
        if ctx.state is None:  # the forward ran under vmap: no single routing to reuse
            raise _per_sample_gradients_error(ctx.spec[0])
        x, gates, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        flags = (need[2], need[3], any(need[7 : 7 + nb]), any(need[7 + nb :]))
        grads = _SparseMixtureBackward.apply(ctx.spec[0], ctx.state, flags, grad_y, x, gates,
                                             *weights)  # fmt: skip
        dx, dgates, *dW = (
            g if wanted else None
            for g, wanted in zip(grads, (flags[0], flags[1], *[flags[2]] * nb, *[flags[3]] * nb))
        )
        db = grad_y.sum(-2, dtype=ctx.bias_dtype) if need[5] else None
        return (None, None, dx, dgates, None, db, None, *dW)

    @staticmethod
    def jvp(ctx, _backend_t, _stash_t, x_t, gates_t, _indices_t, b_t, _n_t, *weights_t):
        x, gates, indices, *weights = ctx.saved_tensors
        nb = ctx.n_buckets
        U, V = weights[:nb], weights[nb:]
        U_t, V_t = weights_t[:nb], weights_t[nb:]
        zero_bias = x.new_zeros(U[0].shape[1])

        def decode(x_, g_, U_, V_):
            return _SparseMixture.apply(
                ctx.spec, _Stash(), x_, g_, indices, zero_bias, nb, *U_, *V_
            )

        def filled(tangents, like):
            return [t if t is not None else torch.zeros_like(w) for t, w in zip(tangents, like)]

        y_t = torch.zeros(x.shape[0], U[0].shape[1], dtype=x.dtype, device=x.device)
        if b_t is not None:
            y_t = y_t + b_t
        if x_t is not None:
            y_t = y_t + decode(x_t, gates, U, V)
        if gates_t is not None:
            # A zero gate is outside the sum, and so is its tangent.
            y_t = y_t + decode(x, torch.where(gates != 0, gates_t, 0), U, V)
        if any(t is not None for t in U_t):
            y_t = y_t + decode(x, gates, filled(U_t, U), V)
        if any(t is not None for t in V_t):
            y_t = y_t + decode(x, gates, U, filled(V_t, V))
        return y_t

    @staticmethod
    def vmap(info, in_dims, spec, stash, x, gates, indices, b_dec, n_buckets, *weights):
        def decode(x_, g_, i_, b_, *w_):
            return _SparseMixture.apply(spec, _Stash(), x_, g_, i_, b_, n_buckets, *w_)

        args, dims = (x, gates, indices, b_dec, *weights), in_dims[2:4] + in_dims[4:6] + in_dims[7:]
        if unbatched(dims, range(3, len(args))):  # shared weights: one decode over B * N tokens
            return fold_into_tokens(info.batch_size, dims, decode, args, token_args=(0, 1, 2))
        return loop_over_batch(info.batch_size, dims, decode, args)


class _SparseMixtureBackward(Function):
    """(dx, dgates, *dU, *dV) of ``_SparseMixture`` (empty where not asked for). First-order
    only: differentiating it raises DoubleBackwardError. Its batch rule runs one backward per
    cotangent, which is how torch.func.jacrev uses it."""

    @staticmethod
    def forward(backend, state, flags, grad_y, x, gates, *weights):
        nb = len(weights) // 2
        backward = _PRIMITIVES[backend][1]
        dx, dgates, dU, dV = backward(state, grad_y.contiguous(), x, gates, weights[:nb],
                                      weights[nb:], flags)  # fmt: skip
        empty = grad_y.new_empty(0)
        return (dx if dx is not None else empty, dgates if dgates is not None else empty,
                *(dU or [empty] * nb), *(dV or [empty] * nb))  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.what = f"lowrank_mixture on the {inputs[0]} backend"

    @staticmethod
    def backward(ctx, *_):
        raise double_backward_error(ctx.what)

    @staticmethod
    def vmap(info, in_dims, backend, state, flags, grad_y, x, gates, *weights):
        if not unbatched(in_dims, range(4, len(in_dims))):
            raise _per_sample_gradients_error(backend)

        def backward(gy):
            return _SparseMixtureBackward.forward(backend, state, flags, gy, x, gates, *weights)

        return loop_over_batch(info.batch_size, in_dims[3:4], backward, (grad_y,))


def sparse_lowrank_mixture(
    backend: str,
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
    allow_tf32: bool = False,
    deterministic: bool = True,
) -> Tensor:
    """The decode of the ``torch`` or ``triton`` backend, differentiable. ``allow_tf32``: the
    triton decode's fp32 dots in TF32 (the torch backend follows torch's own switch).
    ``deterministic=False``: the triton decode's opt-in fp32 atomic combine (run-to-run rounding
    differences; the torch backend is deterministic either way).

    Eager: ``_SparseMixture`` (autograd, torch.func jacrev / jvp / vmap). Under torch.compile,
    which traces no custom jvp or vmap: ``_SparseLowRankMixture`` (torch) or the torch.library op
    and its registered autograd (triton).
    """
    if torch.compiler.is_compiling():
        if backend == "triton":
            return lowrank_mixture_triton(
                x, gates, indices, list(U), list(V), b_dec, allow_tf32=allow_tf32,
                deterministic=deterministic,
            )[0]
        return _SparseLowRankMixture.apply(x, gates, indices, b_dec, len(U), *U, *V)[0]
    spec = (backend, allow_tf32, deterministic)
    return _SparseMixture.apply(spec, _Stash(), x, gates, indices, b_dec, len(U), *U, *V)
