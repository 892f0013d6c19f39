"""Dtype rules shared by every op and layer.

- Accumulation: fp64 inputs accumulate in fp64, everything else in fp32 (gates, sums over
  slots, partial sums).
- Compute on the CPU: half inputs are computed in fp32 there (half matmuls are ~100x slower on
  the CPU) and returned in their own dtype; on the GPU they run as they are.
- Triton kernels read weights as they are stored when that is x's dtype or fp32 under half x
  (fp32 master weights, cast per tile in registers), and their gradients come back in the weights'
  dtype, accumulated in fp32 (:func:`kernel_weight_dtype`).
- fp32 dots of the Triton kernels run in true fp32 (``ieee``) unless TF32 is allowed, by default
  where torch allows it for its own fp32 matmuls (:func:`default_allow_tf32`).
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


def kernel_weight_dtype(weight: torch.dtype, x: torch.dtype) -> torch.dtype:
    """The dtype a Triton kernel reads a weight of dtype ``weight`` in, under activations of dtype
    ``x``: the weight's own when it is x's or fp32 under half x (no copy: each tile is cast to x's
    dtype in registers), else x's (one copy)."""
    return weight if weight == x or (weight == torch.float32 and x in HALF) else x


# Dynamo cannot trace the flag's C getter; it reads it once while tracing instead, and its global
# state guard (which covers torch's TF32 flag, set through either API) recompiles when it changes.
@torch.compiler.assume_constant_result
def default_allow_tf32() -> bool:
    """Whether fp32 Triton dots may use TF32 when the caller does not say: exactly when torch lets
    its own fp32 CUDA matmuls use it (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy ``allow_tf32 = True``;
    this getter reads all three without the legacy/new API mixing error)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``input_precision`` of the Triton dots for inputs of ``dtype``: "tf32" for fp32 when allowed,
    else "ieee" (half dots run on tensor cores anyway; fp64 stays fp64)."""
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"
