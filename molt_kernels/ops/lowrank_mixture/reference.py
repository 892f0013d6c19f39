"""Naive MOLT decode, as public MOLT code computes it: every transform for every token, then mask.

Holds a [N, sum(r)] tensor and costs 2 * N * sum(r) * (d_in + d_out) FLOPs whatever the sparsity.
It is the correctness oracle (run it in float64) and the benchmark baseline.

"A zero gate is outside the sum" is kept literally, also for NaN/Inf: a dense product would
multiply a masked-out pair's zero by a non-finite value in x, U or V (0 * NaN = NaN) and poison
every token, or every transform's gradient. So the dense products see finite stand-ins (zeros)
for non-finite token rows and transforms, and the live pairs that touch one are computed one by
one from the real values, exactly as the sparse backends do: outputs and gradients then take
contributions from live pairs only. Clean inputs never take the per-pair path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
        tok, t = (bucket_live & ~dense).nonzero(as_tuple=True)
        if tok.numel():
            # Live pairs with a non-finite token row or transform, from the real values.
            h_pair = torch.einsum("pd,prd->pr", x[tok], v[t]) * g[tok, t].to(h.dtype)
            y = y.index_add(0, tok, torch.einsum("pr,por->po", h_pair, u[t]))
        start += n
    return y
