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

    fp32 (the CPU gate's dtype): one top-k over packed (value, id) keys, a fixed handful of ops
    per call. Otherwise one top-k decides every row whose k-th value is not tied with an
    unselected element; only rows where a tie straddles the cut (e.g. relu zeros when fewer than
    k are positive) take the exact, slower path. NaN counts as +inf, so a row with NaN still
    yields k distinct indices (only that row changes).
    """
    key = torch.nan_to_num(values, nan=float("inf"))
    if key.dtype == torch.float32 and key.shape[1] < _ID_BASE:
        return _packed_keys(key).topk(k, dim=1).indices
    top = key.topk(k, dim=1)
    straddling = (key >= top.values[:, -1:]).sum(dim=1) > k
    # Equal values inside the selection: ascending ids, then a stable sort by value.
    ids = top.indices.sort(dim=1).values
    ids = ids.gather(1, torch.sort(key.gather(1, ids), dim=1, descending=True, stable=True).indices)
    if torch.compiler.is_compiling():
        # No data-dependent branch in a graph: the exact rule for every row, kept where needed.
        return torch.where(straddling[:, None], _topk_lowest_index_exact(key, k), ids)
    if straddling.any():
        rows = straddling.nonzero()[:, 0]
        ids[rows] = _topk_lowest_index_exact(key[rows], k)
    return ids


# Packed keys hold _ID_BASE - id in their low 32 bits: among equal values the lower id is larger.
_ID_BASE = 2**31 - 1


def _packed_keys(values: Tensor) -> Tensor:
    """int64 keys [N, T] of fp32 values without NaN: signed order = (value, then lower id).

    One top-k over distinct keys then applies the tie rule to every row with a handful of
    elementwise ops and no data-dependent branch (the layout of ops/gate_topk/sort.py's keys).
    """
    bits = values.contiguous().view(torch.int32)
    bits = torch.where(values == 0, 0, bits)  # -0.0 and +0.0 are one value
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving for negatives
    ids = torch.arange(values.shape[1], device=values.device, dtype=torch.int64)
    return (bits.to(torch.int64) << 32) | (_ID_BASE - ids)


def _topk_lowest_index_exact(key: Tensor, k: int) -> Tensor:
    """The tie rule for any row: all values above the k-th, then the lowest-index ties."""
    kth = key.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = key > kth
    ties = key == kth
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (ties & (ties.cumsum(dim=1) <= room))
    # Exactly k per row are chosen; scoring them by reversed id makes a second top-k return them.
    rank_by_id = torch.arange(key.shape[1], 0, -1, device=key.device)
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
