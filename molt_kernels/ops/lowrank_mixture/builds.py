"""Every (kernel, config) the decode's launch code picks, for the gpu-report: captured by running
the launch code on meta tensors with a recording runner."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..configs import MAX_BLOCK_M, MIN_TILE, Launch
from ..dtypes import accumulator_dtype
from ..registry import KernelBuild
from .launch import backward, forward

# One rank per tile class (BLOCK_R 32 / 64 masked / 128 with a rank loop), at the paper's width.
REPORT_RANKS, REPORT_WIDTH, REPORT_SLOTS, REPORT_TRANSFORMS = (32, 48, 512), 2304, 8, 64
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64", torch.int64: "i64"}


def _arg_type(value: object) -> str:
    """Triton's type for a launch argument, with the JIT's divisibility-by-16 specialisation."""
    if isinstance(value, Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    base = "i32" if -(2**31) <= value < 2**31 else "i64"
    return base + (":16" if value % 16 == 0 else "")


def _report_build(
    dtype: torch.dtype, kernel: triton.JITFunction, launch: Launch, args: tuple, kw: dict
) -> KernelBuild:
    """The KernelBuild of one recorded launch for inputs of ``dtype``."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | launch.tiles | kw
    # The JIT turns integer arguments equal to 1 (unit strides) into constants.
    constexprs = {
        n: v for n, v in values.items()
        if n in launch.tiles or n in kw or (type(v) is int and v == 1)
    }
    signature = {n: "constexpr" if n in constexprs else _arg_type(values[n]) for n in names}
    label = [_TYPE_NAMES[dtype]]
    label += [f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in kw.items() if n != "ACC"]
    label += [f"{n}={v}" for n, v in launch.tiles.items()]
    label += [f"w{launch.num_warps}s{launch.num_stages}"]
    return KernelBuild(
        name=f"lowrank{kernel.fn.__name__.removesuffix('_kernel')}",
        config=",".join(label),
        fn=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )


def _recorded_launches(dtype: torch.dtype, rank: int, n_tokens: int) -> list[tuple]:
    """(kernel, launch, args, kwargs) of a forward and backward of one bucket, on meta tensors."""
    meta = dict(device=torch.device("meta"))
    n, width, k = REPORT_TRANSFORMS, REPORT_WIDTH, REPORT_SLOTS
    U = [torch.empty(n, width, rank, dtype=dtype, **meta)]
    V = [torch.empty(n, rank, width, dtype=dtype, **meta)]
    x = torch.empty(n_tokens, width, dtype=dtype, **meta)
    gates = torch.empty(n_tokens, k, dtype=accumulator_dtype(dtype), **meta)
    indices = torch.empty(n_tokens, k, dtype=torch.int64, **meta)
    b_dec = torch.empty(width, dtype=dtype, **meta)
    recorded: list[tuple] = []

    def record(kernel, grid, launch, *args, **kw) -> None:
        recorded.append((kernel, launch, args, kw))

    y, routing, h_pre = forward(x, gates, indices, U, V, b_dec, run=record)
    backward(y, x, gates, routing, U, V, h_pre, (True, True, True, True), run=record)
    return recorded


def gpu_report_builds() -> list[KernelBuild]:
    """Every (kernel, config) the launch code picks at width 2304, for each input dtype, one rank
    per rank-tile class and every BLOCK_M, captured from a forward and backward on meta tensors."""
    builds: dict[tuple[str, str], KernelBuild] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for rank in REPORT_RANKS:
            block_m = MIN_TILE
            while block_m <= MAX_BLOCK_M:
                # Uniform routing: n_tokens * k / T pairs per transform, BLOCK_M half of that.
                n_tokens = 2 * block_m * REPORT_TRANSFORMS // REPORT_SLOTS
                for launch in _recorded_launches(dtype, rank, n_tokens):
                    build = _report_build(dtype, *launch)
                    builds.setdefault((build.name, build.config), build)
                block_m *= 2
    return list(builds.values())
