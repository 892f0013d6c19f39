"""The training objective of a replacement layer (a MOLT or a TopK transcoder), with k chosen per
step (k annealing) and batch top-k, as one ``nn.Module`` so that DDP can wrap it.

Loss: mean over tokens and output dims of ``out_weight * (pred - y)^2`` (``out_weight`` = 1 / the
output variance, normalised to mean 1, reads as a fraction of variance), plus for MOLTs
``sparsity_coef * sparsity_penalty`` (tanh or L1 of gate x ||U_t V_t||_F, see
``MOLT.sparsity_penalty``).

Batch top-k (Bussmann et al., 2024): instead of k units per token, the ``k * n_tokens`` largest
gates of the whole batch are kept, so busy tokens get more units and easy ones fewer. Candidates
are each token's ``BATCH_TOPK_CANDIDATES * k`` largest gates (bounded memory; a token can use at
most that many units). It is a training-time selection: the trained layer keeps its per-token
top-k at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from molt_kernels.layers.molt import MOLT

BATCH_TOPK_CANDIDATES = 4


def n_units(layer: nn.Module) -> int:
    """Transforms of a MOLT, features of a transcoder."""
    return layer.cfg.n_transforms if isinstance(layer, MOLT) else layer.cfg.n_features


def output_weights(y: Tensor, standardize: bool = True) -> Tensor:
    """Per-output-dim loss weights [d_out] from outputs y [n, d_out]: 1 / variance (or 1),
    normalised to mean 1."""
    weight = 1.0 / y.var(0).clamp_min(1e-12) if standardize else torch.ones_like(y[0])
    return weight / weight.mean()


def batch_topk(gates: Tensor, k: int) -> Tensor:
    """gates [n, m] with all but the ``k * n`` largest entries of the whole batch set to zero
    (differentiably for the kept ones). Ties: ``torch.topk``'s choice, deterministic on a device."""
    flat = gates.reshape(-1)
    keep = k * gates.shape[0]
    if keep >= flat.numel():
        return gates
    chosen = flat.detach().topk(keep, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, chosen, True)
    return (gates * mask.view_as(gates)).view_as(gates)


class LayerObjective(nn.Module):
    """``forward(x [n, d_in], y [n, d_out], k, sparsity_coef)`` -> (loss, pred, gates, indices).

    ``k`` replaces the layer's ``cfg.k`` for this call (k annealing); with ``batch_topk`` it is
    the per-token average of a batch top-k. ``out_weight`` [d_out] weights the squared error.
    """

    def __init__(
        self,
        layer: nn.Module,
        out_weight: Tensor,
        sparsity_form: str = "tanh",
        sparsity_c: float = 1.0,
        batch_topk: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        # A plain tensor, not a buffer: every rank computes the same one, nothing to broadcast.
        self.out_weight = out_weight
        self.sparsity_form, self.sparsity_c = sparsity_form, sparsity_c
        self.batch_topk = batch_topk

    def forward(
        self, x: Tensor, y: Tensor, k: int | None, sparsity_coef: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        layer = self.layer
        if self.batch_topk:
            if k is None:
                raise ValueError("batch top-k needs a k")
            candidates = min(n_units(layer), BATCH_TOPK_CANDIDATES * k)
            gates, indices = layer.encode(x, k=candidates)
            gates = batch_topk(gates, k)
        else:
            gates, indices = layer.encode(x, k=k)
        pred = layer.decode(x, gates, indices)
        loss = ((pred.float() - y.float()).square() * self.out_weight).mean()
        if isinstance(layer, MOLT) and sparsity_coef > 0:
            penalty = layer.sparsity_penalty(gates, indices, self.sparsity_form, self.sparsity_c)
            loss = loss + sparsity_coef * penalty.float()
        return loss, pred, gates, indices
