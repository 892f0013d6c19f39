"""Naive MOLT decode, as public MOLT code computes it: every transform for every token, then mask.

Holds a [N, sum(r)] tensor and costs 2 * N * sum(r) * (d_in + d_out) FLOPs whatever the sparsity.
It is the correctness oracle (run it in float64) and the benchmark baseline.

"A zero gate is outside the sum" is kept literally, also for NaN/Inf: a dense product would
multiply a masked-out pair's zero by a non-finite value in x, U or V (0 * NaN = NaN) and poison
every token, or every transform's gradient. So the dense products see finite stand-ins (zeros)
for non-finite token rows and transforms, and the live pairs that touch one are computed one by
one from the real values, exactly as the sparse backends do: outputs and gradients then take
contributions from live pairs only. For clean inputs the pair list is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import Function

from ..batching import loop_over_batch


def _finite_rows(t: Tensor) -> Tensor:
    """[t.shape[0]] bool: whether every value of each leading-dim slice is finite."""
    return t.detach().flatten(1).isfinite().all(1)


def lowrank_mixture_reference(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor,
) -> Tensor:
    """y [N, d_out] = sum over (t in indices, gate != 0) of gate * U_t V_t x, plus b_dec.

    x [N, d_in]; gates [N, k]; indices [N, k] int64; U[b] [n_b, d_out, r_b]; V[b] [n_b, r_b, d_in].
    """
    n_tokens = x.shape[0]
    n_transforms = sum(v.shape[0] for v in V)
    live_gates = torch.zeros(n_tokens, n_transforms, dtype=gates.dtype, device=x.device)
    live_gates = live_gates.scatter(1, indices, gates)
    live = live_gates != 0  # zero gates are outside the sum, and so is their gradient
    x_ok = _finite_rows(x)
    x_safe = torch.where(x_ok[:, None], x, 0)
    y = b_dec.expand(n_tokens, -1)
    start = 0
    for u, v in zip(U, V):
        n = v.shape[0]
        t_ok = _finite_rows(u) & _finite_rows(v)
        u_safe = torch.where(t_ok[:, None, None], u, 0)
        v_safe = torch.where(t_ok[:, None, None], v, 0)
        bucket_live = live[:, start : start + n]
        dense = bucket_live & x_ok[:, None] & t_ok[None, :]
        h = torch.einsum("nd,trd->ntr", x_safe, v_safe)
        g = live_gates[:, start : start + n, None].to(h.dtype)
        h = torch.where(dense[..., None], h * g, 0)
        y = y + torch.einsum("ntr,tor->no", h, u_safe)
        # Live pairs with a non-finite token row or transform, from the real values. Under
        # torch.compile, which traces no custom jvp or vmap, the plain function.
        pairs = _selected_pairs if torch.compiler.is_compiling() else _SelectedPairs.apply
        y = y + pairs(x, g[..., 0], u, v, bucket_live & ~dense)
        start += n
    return y


def _selected_pairs(x: Tensor, g: Tensor, u: Tensor, v: Tensor, pairs: Tensor) -> Tensor:
    """[N, d_out]: sum over the (token, transform) pairs where ``pairs`` [N, n] is set of
    g[token, t] U_t (V_t x_token), pair by pair (none: zeros). g [N, n]; u, v one bucket's."""
    tok, t = pairs.nonzero(as_tuple=True)
    h = torch.einsum("pd,prd->pr", x[tok], v[t]) * g[tok, t][:, None]
    out = torch.zeros(x.shape[0], u.shape[1], dtype=h.dtype, device=x.device)
    return out.index_add(0, tok, torch.einsum("pr,por->po", h, u[t]))


class _SelectedPairs(Function):
    """``_selected_pairs`` for torch.func: its pair list has a data-dependent length, which vmap
    cannot batch, so the batch rule runs it per sample; the backward and jvp are torch.func's own
    on the unbatched saved inputs, hence differentiable to any order like the rest of the
    reference."""

    @staticmethod
    def forward(x: Tensor, g: Tensor, u: Tensor, v: Tensor, pairs: Tensor) -> Tensor:
        return _selected_pairs(x, g, u, v, pairs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        *primals, pairs = ctx.saved_tensors
        _, vjp = torch.func.vjp(lambda *p: _selected_pairs(*p, pairs), *primals)
        return (*vjp(grad_out), None)

    @staticmethod
    def jvp(ctx, *tangents):
        *primals, pairs = ctx.saved_tensors
        tangents = [t if t is not None else torch.zeros_like(p) for t, p in zip(tangents, primals)]
        return torch.func.jvp(
            lambda *p: _selected_pairs(*p, pairs), tuple(primals), tuple(tangents)
        )[1]

    @staticmethod
    def vmap(info, in_dims, *args):
        return loop_over_batch(info.batch_size, in_dims, _SelectedPairs.apply, args)
