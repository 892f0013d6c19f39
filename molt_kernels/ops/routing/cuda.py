"""Routing with the CUDA kernels of csrc/routing.cu, built on first use.

The extension is compiled with torch.utils.cpp_extension.load the first time it is asked for (then
cached by torch's build directory) and registers ``torch.ops.molt_kernels.route_pairs_cuda``. It
needs a CUDA build of torch, a CUDA device, nvcc and the csrc/ sources, which ship inside the
package (``molt_kernels/csrc``: a link to the repository's top-level csrc/ in a checkout, copied
files in a wheel). Without any of them :func:`load_extension` returns None and callers use
``route_pairs_torch``, whose output is bit-identical; a CUDA user is told why once, as a warning.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor

from ..extension import CSRC, build, missing_sources
from . import Routing, region_starts

log = logging.getLogger(__name__)

SOURCES = ("routing.cu", "routing_torch.cpp")
EXTENSION_NAME = "molt_kernels_routing"


def unavailable_reason() -> str | None:
    """Why the extension cannot be built here, or None if it can be tried."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return (
            f"no CUDA toolkit (nvcc) found: install the CUDA toolkit {torch.version.cuda} (nvcc) "
            "and set CUDA_HOME to it"
        )
    return missing_sources(SOURCES)


@functools.cache
def load_extension() -> ModuleType | None:
    """``torch.ops.molt_kernels`` with ``route_pairs_cuda`` built and loaded, or None.

    None means: use ``route_pairs_torch``. On a CUDA device the reason is logged once, as a
    warning (without a device or with CPU-only torch nothing is said: there is nothing to fix).
    Cached: the build is attempted once per process.
    """
    reason = unavailable_reason()
    if reason is not None:
        if torch.cuda.is_available():
            log.warning("CUDA routing extension unavailable, using PyTorch routing: %s", reason)
        return None
    flags = dict(extra_include_paths=[str(CSRC)], extra_cuda_cflags=["-O3"])
    if not build(EXTENSION_NAME, SOURCES, log, "PyTorch routing", **flags):
        return None
    torch.library.register_fake("molt_kernels::route_pairs_cuda")(_route_pairs_fake)
    return torch.ops.molt_kernels


def _route_pairs_fake(
    indices: Tensor, keep: Tensor, bucket_sizes: list[int], block_m: list[int]
) -> tuple[Tensor, ...]:
    """Output shapes for torch.compile: every size follows from the input shapes."""
    n_tokens, n_slots = indices.shape
    block_start, row_start = region_starts(n_tokens, n_slots, bucket_sizes, block_m)
    new = indices.new_empty
    return (
        new(row_start[-1]),
        new(n_tokens * n_slots),
        new(block_start[-1]),
        new(len(bucket_sizes)),
        new(sum(bucket_sizes)),
    )


def route_pairs_cuda(
    indices: Tensor, keep: Tensor, bucket_sizes: tuple[int, ...], block_m: tuple[int, ...]
) -> Routing:
    """``route_pairs`` on CUDA tensors with the csrc/ kernels; requires :func:`load_extension`."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the CUDA routing extension is unavailable; use route_pairs_torch")
    pair_of_row, row_of_pair, transform_of_block, blocks_used, pair_counts = ext.route_pairs_cuda(
        indices, keep, list(bucket_sizes), list(block_m)
    )
    n_tokens, n_slots = indices.shape
    block_start, row_start = region_starts(n_tokens, n_slots, bucket_sizes, block_m)
    return Routing(
        pair_of_row=pair_of_row,
        row_of_pair=row_of_pair,
        transform_of_block=transform_of_block,
        blocks_used=blocks_used,
        pair_counts=pair_counts,
        n_slots=n_slots,
        block_m=tuple(block_m),
        block_start=block_start,
        row_start=row_start,
    )
