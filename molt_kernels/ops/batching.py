"""Batch rules (``torch.func.vmap``) for the ops' hand-written autograd Functions.

Routing is data-dependent, so a sparse op has no batched form of its own. Two rules cover it:

- ``fold_into_tokens``: the ops are per token, so a vmap over token inputs alone (x, gates,
  indices; the weights shared) is the op over B * N tokens, in one call.
- ``loop_over_batch``: anything else (batched weights, a batch of cotangents in
  ``torch.func.jacrev``) runs the op once per sample and stacks the results.

Both follow ``torch.autograd.Function.vmap``'s contract: ``in_dims`` holds each argument's batch
dim (None: not batched, or not a tensor); the result is (outputs, out_dims).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]


def unbatched(in_dims: Sequence[int | None], positions: Sequence[int]) -> bool:
    """Whether none of the arguments at ``positions`` is batched."""
    return all(in_dims[i] is None for i in positions)


def _batch_first(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    if dim is None:
        return t.unsqueeze(0).expand(batch_size, *t.shape)
    return t.movedim(dim, 0)


def fold_into_tokens(
    batch_size: int,
    in_dims: Sequence[int | None],
    fn: Callable[..., Outputs],
    args: Sequence[Any],
    token_args: Sequence[int],
) -> tuple[Outputs, Any]:
    """``fn`` once over B * N tokens: the arguments at ``token_args`` ([N, ...] per sample) get
    their batch dim merged into the token dim; every other argument must be unbatched. Every
    output of ``fn`` is per token ([B * N, ...]) and comes back as [B, N, ...]."""
    folded = list(args)
    for i in token_args:
        t = _batch_first(args[i], in_dims[i], batch_size)
        folded[i] = t.reshape(batch_size * t.shape[1], *t.shape[2:])
    out = fn(*folded)

    def unfold(t: Tensor) -> Tensor:
        return t.reshape(batch_size, t.shape[0] // batch_size, *t.shape[1:])

    if isinstance(out, Tensor):
        return unfold(out), 0
    return tuple(unfold(t) for t in out), (0,) * len(out)


def loop_over_batch(
    batch_size: int, in_dims: Sequence[int | None], fn: Callable[..., Outputs], args: Sequence[Any]
) -> tuple[Outputs, Any]:
    """``fn`` on each sample (batched arguments indexed along their batch dim), stacked."""
    results = [
        fn(*(a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)))
        for b in range(batch_size)
    ]
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
