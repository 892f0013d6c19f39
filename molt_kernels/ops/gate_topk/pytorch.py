"""Gate in plain PyTorch: F.linear, activation, top-k with the lower-id-wins tie rule.

This path materialises the [N, T] logits (the fused Triton kernel exists to avoid that) but selects
in O(T) per token instead of sorting.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from ..batching import fold_into_tokens
from ..lowrank_mixture import cpu as cpu_extension
from .activation import apply_activation
from .linear import gate_logits


def order_key(values: Tensor) -> Tensor:
    """int64 keys [same shape] whose order is exactly the values' order, for any float dtype:
    equal values (-0.0 and +0.0 included) get equal keys, and NaN ranks above +inf, as
    ``torch.sort`` ranks it. Comparing fp64 values through int64 keeps ties exact on every device.
    """
    v = values.to(torch.float64)  # exact for every float dtype
    bits = torch.where(v == 0, 0.0, v).view(torch.int64)
    # Negative doubles order backwards as signed integers: flip their magnitude bits.
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    return torch.where(v.isnan(), torch.iinfo(torch.int64).max, key)


def topk_lowest_index(values: Tensor, k: int) -> Tensor:
    """Indices [N, k] of the k largest values per row, ties to the lower index, in order.

    On the CPU in fp32 / fp64 with the C++ extension built: its one-pass selection per row
    (``cpu_extension``). Else, fp32: one top-k over packed (value, id) keys, a fixed handful of
    ops per call. Other dtypes rank on ``order_key``: one top-k decides every row whose k-th
    value is not tied with an unselected element; only rows where a tie straddles the cut (e.g.
    relu zeros when fewer than k are positive) take the exact, slower path. Either way the tie
    rule holds exactly and NaN ranks first, as in the reference's sort.
    """
    if cpu_extension.usable_for(values):
        return torch.ops.molt_kernels.topk_lowest_index_cpu(values, k)
    if values.dtype == torch.float32 and values.shape[1] < _ID_BASE:
        return _packed_keys(values).topk(k, dim=1).indices
    key = order_key(values)
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
    """int64 keys [N, T] of fp32 values: signed order = (value, then lower id), NaN highest.

    One top-k over distinct keys then applies the tie rule to every row with a handful of
    elementwise ops and no data-dependent branch (the layout of ops/gate_topk/sort.py's keys).
    """
    bits = values.contiguous().view(torch.int32)
    bits = torch.where(values == 0, 0, bits)  # -0.0 and +0.0 are one value
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving for negatives
    bits = torch.where(values.isnan(), 0x7FFFFFFF, bits)  # above +inf, as torch.sort ranks NaN
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


class _SelectTopk(Function):
    """``topk_lowest_index`` as a Function whose batch rule folds a vmapped batch into the rows
    (the selection is per row): its exact tie path branches on the data, which vmap cannot."""

    @staticmethod
    def forward(values: Tensor, k: int) -> Tensor:
        return topk_lowest_index(values, k)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def vmap(info, in_dims, values, k):
        return fold_into_tokens(
            info.batch_size, in_dims, lambda v, k_: _SelectTopk.apply(v, k_), (values, k), (0,)
        )


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
    acts = apply_activation(gate_logits(x, W_gate, b_gate), activation, log_threshold, bandwidth)
    n, t = acts.shape
    if k is None:
        return acts, torch.arange(t, device=x.device).expand(n, t)
    idx = _SelectTopk.apply(acts.detach(), k)
    return acts.gather(1, idx), idx
