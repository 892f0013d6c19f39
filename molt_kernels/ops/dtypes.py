"""Dtype rules shared by every op and layer.

- Accumulation: fp64 inputs accumulate in fp64, everything else in fp32 (gates, sums over
  slots, partial sums).
- Compute on the CPU: half inputs are computed in fp32 there (half matmuls are ~100x slower on
  the CPU) and returned in their own dtype; on the GPU they run as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half inputs on the CPU, else x's dtype."""
    if x.dtype in HALF and x.device.type == "cpu":
        return torch.float32
    return x.dtype
