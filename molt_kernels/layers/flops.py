"""Analytic parameter counts and FLOPs per token of a MOLT, its dense reference, a TopK transcoder
and a dense MLP, plus the parameter-matched transcoder of a MOLT.

What is counted: matmul FLOPs only, 2 per multiply-add, as ``torch.utils.flop_counter`` counts
them (mm, addmm, bmm, ...). Elementwise work (activations, gating, biases, the top-k) is not.
Backward = 2 x forward: every matmul's backward forms the gradient of both its operands (the input
x included), each as large as the forward.

MOLT, per token: the gate costs 2 d_in T; each active transform t costs 2 r_t (d_in + d_out)
(shrink V_t x, expand U_t h). "Useful" FLOPs count only the active transforms; the dense
reference computes every transform: 2 sum(r) (d_in + d_out). The sum of the active ranks depends
on the routing: :func:`uniform_active_rank` gives its expectation when the active transforms are
uniform over the T transforms, :func:`routed_active_rank` measures it from a routing.

TopK transcoder with F features: the encoder costs 2 d_in F; the sparse decoder 2 k d_out (k rows
of W_dec); the naive dense decoder 2 F d_out; the skip connection 2 d_in d_out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .config import MOLTConfig
from .transcoder import TranscoderConfig

FLOPS_PER_MAC = 2
BACKWARD_PER_FORWARD = 2


@dataclass(frozen=True)
class LayerCost:
    """Parameters and matmul FLOPs per token of one layer."""

    params: int
    forward: float

    @property
    def backward(self) -> float:
        return BACKWARD_PER_FORWARD * self.forward

    @property
    def forward_backward(self) -> float:
        return self.forward + self.backward


def _matmul(m: float, n: float) -> float:
    """FLOPs of one token through an [m, n] matrix."""
    return FLOPS_PER_MAC * m * n


def uniform_active_rank(cfg: MOLTConfig, n_active: float | None = None) -> float:
    """Expected sum of the ranks of ``n_active`` transforms drawn uniformly from the T transforms
    (default: ``cfg.k``, or ``cfg.expected_l0_at_init`` when k is None)."""
    if n_active is None:
        n_active = cfg.k if cfg.k is not None else cfg.expected_l0_at_init
    return n_active * cfg.total_rank / cfg.n_transforms


def transform_ranks(cfg: MOLTConfig, device: torch.device | str | None = None) -> Tensor:
    """r_t of every transform t [T] int64, in global (bucket-major) id order."""
    ranks = torch.tensor(cfg.ranks, dtype=torch.int64, device=device)
    counts = torch.tensor(cfg.counts, dtype=torch.int64, device=device)
    return torch.repeat_interleave(ranks, counts, output_size=cfg.n_transforms)


def routed_active_rank(cfg: MOLTConfig, indices: Tensor, gates: Tensor | None = None) -> float:
    """Mean over tokens of the sum of r_t over the token's active transforms.

    indices [..., k] int64 transform ids; gates [..., k] (pairs with a zero gate are inactive).
    """
    ranks = transform_ranks(cfg, indices.device)[indices]
    if gates is not None:
        ranks = ranks * (gates != 0)
    n_tokens = indices.shape[:-1].numel()
    return ranks.sum().item() / n_tokens if n_tokens else 0.0


def molt_cost(cfg: MOLTConfig, active_rank: float | None = None) -> LayerCost:
    """Useful cost of a MOLT: the gate plus the active transforms only.

    ``active_rank``: sum of the active transforms' ranks per token (default
    :func:`uniform_active_rank`).
    """
    if active_rank is None:
        active_rank = uniform_active_rank(cfg)
    gate = _matmul(cfg.d_in, cfg.n_transforms)
    return LayerCost(cfg.n_parameters(), gate + _matmul(active_rank, cfg.d_in + cfg.d_out))


def molt_reference_cost(cfg: MOLTConfig) -> LayerCost:
    """Cost of the naive dense reference: the gate plus every transform for every token."""
    return molt_cost(cfg, active_rank=float(cfg.total_rank))


def transcoder_cost(cfg: TranscoderConfig, dense_decode: bool = False) -> LayerCost:
    """Cost of a TopK transcoder; ``dense_decode`` for its naive reference (all F rows)."""
    decoded = cfg.n_features if dense_decode else cfg.k
    flops = _matmul(cfg.d_in, cfg.n_features) + _matmul(decoded, cfg.d_out)
    if cfg.skip:
        flops += _matmul(cfg.d_in, cfg.d_out)
    return LayerCost(cfg.n_parameters(), flops)


def mlp_cost(d_in: int, width: int, d_out: int | None = None) -> LayerCost:
    """Cost of a dense two-layer MLP d_in -> width -> d_out, with biases."""
    d_out = d_in if d_out is None else d_out
    params = width * (d_in + 1) + d_out * (width + 1)
    return LayerCost(params, _matmul(d_in, width) + _matmul(width, d_out))


def matched_transcoder(
    cfg: MOLTConfig, k: int | None = None, skip: bool = False
) -> TranscoderConfig:
    """The TopK transcoder with as many parameters as the MOLT (to within half a feature).

    ``k`` defaults to the MOLT's k (its expected L0 at init when k is None), capped at F.
    """
    per_feature = cfg.d_in + cfg.d_out + 1
    fixed = cfg.d_out + (cfg.d_in * cfg.d_out if skip else 0)
    n_features = max(1, round((cfg.n_parameters() - fixed) / per_feature))
    if k is None:
        k = cfg.k if cfg.k is not None else max(1, round(cfg.expected_l0_at_init))
    return TranscoderConfig(
        d_in=cfg.d_in, n_features=n_features, k=min(k, n_features), d_out=cfg.d_out, skip=skip
    )


def measured_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Matmul FLOPs that ``fn(*args, **kwargs)`` executes, by FlopCounterMode (include a
    ``.backward()`` inside ``fn`` to count the backward pass)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


MLP_RATIO = 4  # a transformer MLP's hidden width, in multiples of d_model
