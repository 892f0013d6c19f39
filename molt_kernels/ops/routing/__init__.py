"""Routing: group (token, slot) pairs by transform, padded per transform to its bucket's BLOCK_M.

Every grouped matmul of the package (shrink, expand, grouped X^T Y, the gate's sparse weight
gradient) reads this layout: each block of BLOCK_M rows belongs to one transform, so a kernel
program loads one transform's weights and a gathered tile of rows.

Layout. Bucket ``b`` owns a fixed region of ``block_capacity[b]`` blocks of ``block_m[b]`` rows,
whose size depends only on shapes (an upper bound), so grids can be sized without reading the
routing back to the host; ``blocks_used[b]`` (on the device) says how many blocks hold pairs and
surplus programs exit. Inside a bucket, transforms follow in id order; within a transform, pairs
follow in flat pair order (token-major), which fixes every reduction order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """Pairs grouped by transform. Flat pair id = token * n_slots + slot."""

    pair_of_row: Tensor  # int64 [total_rows]; -1 on padding rows
    row_of_pair: Tensor  # int64 [n_tokens * n_slots]; -1 for dropped pairs
    transform_of_block: Tensor  # int64 [total_blocks]; global transform id, -1 if unused
    blocks_used: Tensor  # int64 [n_buckets]
    pair_counts: Tensor  # int64 [T]; kept pairs per transform
    n_slots: int
    block_m: tuple[int, ...]
    block_start: tuple[int, ...]  # first block of each bucket's region, plus the total
    row_start: tuple[int, ...]  # first row of each bucket's region, plus the total

    @property
    def n_buckets(self) -> int:
        return len(self.block_m)

    def block_capacity(self, bucket: int) -> int:
        return self.block_start[bucket + 1] - self.block_start[bucket]


def block_capacity(n_tokens: int, n_slots: int, n_transforms: int, block_m: int) -> int:
    """Upper bound on the blocks a bucket of ``n_transforms`` can need.

    A token selects a transform at most once, so the bucket holds at most
    P = n_tokens * min(n_slots, n_transforms) pairs; padding adds at most one block per transform
    that holds a pair, since sum(ceil(c_t / M)) <= floor(P / M) + #{t : c_t > 0}.
    """
    pairs = n_tokens * min(n_slots, n_transforms)
    return pairs // block_m + min(n_transforms, pairs)


def bucket_starts(bucket_sizes: Sequence[int]) -> tuple[int, ...]:
    """Global id of each bucket's first transform, plus the total: length n_buckets + 1."""
    starts = [0]
    for n in bucket_sizes:
        starts.append(starts[-1] + n)
    return tuple(starts)


def region_starts(
    n_tokens: int, n_slots: int, bucket_sizes: Sequence[int], block_m: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block_start, row_start): each bucket's region in blocks and rows, plus the totals.

    Depends on shapes alone (see :func:`block_capacity`), so kernels and fake implementations
    can size everything without reading the routing.
    """
    block_start, row_start = [0], [0]
    for n, m in zip(bucket_sizes, block_m):
        cap = block_capacity(n_tokens, n_slots, n, m)
        block_start.append(block_start[-1] + cap)
        row_start.append(row_start[-1] + cap * m)
    return tuple(block_start), tuple(row_start)


def route_pairs(
    indices: Tensor, keep: Tensor, bucket_sizes: tuple[int, ...], block_m: tuple[int, ...]
) -> Routing:
    """Group the kept pairs of ``indices`` [N, k] (int64 transform ids) by transform.

    ``keep`` [N, k] bool marks the pairs to route (the others, e.g. zero gates, are dropped).
    No host synchronisation on any device. On CUDA tensors the csrc/ kernels run when they can be
    built (see ``cuda.py``), else the PyTorch implementation.
    """
    if indices.is_cuda:
        from .cuda import load_extension, route_pairs_cuda

        if load_extension() is not None:
            return route_pairs_cuda(indices, keep, bucket_sizes, block_m)
    from .pytorch import route_pairs_torch

    return route_pairs_torch(indices, keep, bucket_sizes, block_m)
