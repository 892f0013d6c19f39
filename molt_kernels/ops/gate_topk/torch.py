"""Gate in plain PyTorch: F.linear, activation, top-k with the lower-id-wins tie rule.

This path materialises the [N, T] logits (the fused Triton kernel exists to avoid that) but selects
in O(T) per token instead of sorting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import apply_activation


def topk_lowest_index(values: Tensor, k: int) -> Tensor:
    """Indices [N, k] of the k largest values per row, ties to the lower index, in order.

    NaN counts as +inf, so a row with NaN still yields k distinct indices (only that row changes).
    """
    key = torch.nan_to_num(values, nan=float("inf"))
    kth = key.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = key > kth
    ties = key == kth
    # Fill the remaining places with the lowest-index ties.
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (ties & (ties.cumsum(dim=1) <= room))
    # Exactly k per row are chosen; scoring them by reversed id makes a second top-k return them.
    t = values.shape[1]
    rank_by_id = torch.arange(t, 0, -1, device=values.device)
    ids = torch.where(chosen, rank_by_id, 0).topk(k, dim=1, sorted=False).indices
    ids = ids.sort(dim=1).values  # ascending ids, so the stable sort below breaks ties by id
    order = torch.sort(key.gather(1, ids), dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def gate_topk_torch(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str,
    log_threshold: Tensor | None,
    bandwidth: float,
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> gates [N, k], indices [N, k] int64 (k=None: all T, in id order)."""
    acts = apply_activation(F.linear(x, W_gate, b_gate), activation, log_threshold, bandwidth)
    n, t = acts.shape
    if k is None:
        return acts, torch.arange(t, device=x.device).expand(n, t)
    idx = topk_lowest_index(acts.detach(), k)
    return acts.gather(1, idx), idx
