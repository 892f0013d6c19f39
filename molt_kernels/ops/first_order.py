"""Gradients that refuse to be differentiated again, with an error that says so.

The sparse backends' backward passes (torch and triton) are hand-written first-order formulas over
saved routing and rank-space activations. Their results carry no correct graph back to the inputs,
so a second backward would be silently wrong (or fail with an opaque "no autograd formula").
Callers compute them under ``torch.no_grad()`` and pass them through ``first_order_only``, which,
when a graph was asked for (``create_graph=True``), puts them behind a node whose backward raises
``DoubleBackwardError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import Function


class DoubleBackwardError(RuntimeError):
    """A gradient of a first-order-only op was differentiated again."""


class _Refuse(Function):
    """Identity on the gradients (the anchor only links the node into the graph); differentiating
    through it raises DoubleBackwardError."""

    generate_vmap_rule = True  # so that torch.func.jacrev can vmap the backward through it

    @staticmethod
    def forward(what: str, anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.what = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise double_backward_error(ctx.what)


def double_backward_error(what: str) -> DoubleBackwardError:
    """The error of differentiating ``what``'s (the op and backend) gradients again."""
    return DoubleBackwardError(
        f"{what} supports first-order gradients only: double backward (gradients of "
        "gradients, Hessian-vector products, create_graph=True) is not implemented; use "
        "backend='reference' for higher-order derivatives"
    )


def first_order_only(
    what: str, grads: Sequence[Tensor | None], inputs: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """``grads`` unchanged, unless grad mode is on (the backward runs with create_graph=True) and
    one of the op's ``inputs`` requires grad: then behind a node that refuses a second backward.
    ``what`` names the op and backend in the error."""
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    present = [g for g in grads if g is not None]
    if not torch.is_grad_enabled() or anchor is None or not present:
        return list(grads)
    guarded = iter(_Refuse.apply(what, anchor, *present))
    return [next(guarded) if g is not None else None for g in grads]
