"""Routing in plain PyTorch ops: runs on any device with no host synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Routing, bucket_starts, region_starts


def route_pairs_torch(
    indices: Tensor, keep: Tensor, bucket_sizes: tuple[int, ...], block_m: tuple[int, ...]
) -> Routing:
    """Group the kept pairs of ``indices`` [N, k] (int64 transform ids) by transform.

    ``keep`` [N, k] bool marks the pairs to route (the others, e.g. zero gates, are dropped).
    Runs on any device with no host synchronisation.
    """
    n_tokens, n_slots = indices.shape
    device = indices.device
    n_transforms = sum(bucket_sizes)
    n_pairs = n_tokens * n_slots
    long = dict(dtype=torch.int64, device=device)

    block_start, row_start = region_starts(n_tokens, n_slots, bucket_sizes, block_m)
    first_t = bucket_starts(bucket_sizes)
    total_rows, total_blocks = row_start[-1], block_start[-1]

    # Per-transform constants of its bucket.
    sizes = torch.tensor(bucket_sizes, **long)
    m_of_t = torch.repeat_interleave(torch.tensor(block_m, **long), sizes, output_size=n_transforms)
    bucket_block0 = torch.repeat_interleave(
        torch.tensor(block_start[:-1], **long), sizes, output_size=n_transforms
    )
    bucket_row0 = torch.repeat_interleave(
        torch.tensor(row_start[:-1], **long), sizes, output_size=n_transforms
    )
    bucket_t0 = torch.repeat_interleave(
        torch.tensor(first_t[:-1], **long), sizes, output_size=n_transforms
    )

    # Dropped pairs get the sentinel transform T, so they sort last and fall out of the counts.
    key = torch.where(keep.reshape(-1), indices.reshape(-1), n_transforms)
    counts = torch.zeros(n_transforms + 1, **long).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:n_transforms]
    order = torch.sort(key, stable=True).indices

    blocks = (counts + m_of_t - 1) // m_of_t
    blocks_before = torch.cumsum(blocks, 0) - blocks
    blocks_before_in_bucket = blocks_before - blocks_before[bucket_t0]
    first_block = bucket_block0 + blocks_before_in_bucket
    first_row = bucket_row0 + blocks_before_in_bucket * m_of_t
    pairs_before = torch.cumsum(counts, 0) - counts

    t_sorted = key[order]
    valid = t_sorted < n_transforms
    t_safe = t_sorted.clamp(max=max(n_transforms - 1, 0))
    rank_in_t = torch.arange(n_pairs, **long) - pairs_before[t_safe]
    # Dropped pairs land in one scratch row past the end, sliced off below.
    row = torch.where(valid, first_row[t_safe] + rank_in_t, total_rows)
    pair_of_row = torch.full((total_rows + 1,), -1, **long).scatter_(0, row, order)[:total_rows]
    row_of_pair = torch.empty(n_pairs, **long).scatter_(0, order, torch.where(valid, row, -1))

    transform_of_block = torch.full((total_blocks,), -1, **long)
    blocks_used = []
    end_block = first_block + blocks
    for b, n in enumerate(bucket_sizes):
        t0 = first_t[b]
        ends = end_block[t0 : t0 + n]
        j = torch.arange(block_start[b], block_start[b + 1], **long)
        local = torch.searchsorted(ends, j, right=True)
        transform_of_block[block_start[b] : block_start[b + 1]] = torch.where(
            local < n, local + t0, -1
        )
        blocks_used.append(blocks[t0 : t0 + n].sum())
    return Routing(
        pair_of_row=pair_of_row,
        row_of_pair=row_of_pair,
        transform_of_block=transform_of_block,
        blocks_used=torch.stack(blocks_used) if blocks_used else torch.zeros(0, **long),
        pair_counts=counts,
        n_slots=n_slots,
        block_m=tuple(block_m),
        block_start=tuple(block_start),
        row_start=tuple(row_start),
    )
