"""Naive MOLT decode, as public MOLT code computes it: every transform for every token, then mask.

Holds a [N, sum(r)] tensor and costs 2 * N * sum(r) * (d_in + d_out) FLOPs whatever the sparsity.
It is the correctness oracle (run it in float64) and the benchmark baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
    n_transforms = sum(v.shape[0] for v in V)
    # Zero gates are outside the sum: masking them also zeroes their gradient.
    live = gates * (gates != 0)
    dense_gates = torch.zeros(x.shape[0], n_transforms, dtype=live.dtype, device=x.device)
    dense_gates = dense_gates.scatter(1, indices, live)
    y = b_dec.expand(x.shape[0], -1)
    start = 0
    for u, v in zip(U, V):
        n = v.shape[0]
        h = torch.einsum("nd,trd->ntr", x, v)
        h = h * dense_gates[:, start : start + n, None].to(h.dtype)
        y = y + torch.einsum("ntr,tor->no", h, u)
        start += n
    return y
