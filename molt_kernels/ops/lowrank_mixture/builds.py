"""Every (kernel, config) the decode's launch code picks, for the gpu-report: captured by running
the launch code on meta tensors with a recording runner."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import triton
from torch import Tensor

from ..configs import GPU_ARCHS, Launch
from ..dtypes import accumulator_dtype
from ..registry import KernelBuild
from .launch import backward, forward

# The paper's ranks (one launch covers every bucket) at its width; ranks 48 and 512 are masked
# and looped over rank tiles.
REPORT_RANK_COUNTS, REPORT_WIDTH, REPORT_SLOTS = {512: 2, 256: 2, 48: 4, 32: 8}, 2304, 8
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}
# (x dtype, weight dtype, allow_tf32) the launch code is compiled for: each dtype as it is, fp32
# master weights under bf16 x (cast per tile in registers; fp16 compiles alike) and fp32 in TF32.
REPORT_VARIANTS = (
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False),
    (torch.float16, torch.float16, False),
    (torch.float32, torch.float32, False),
    (torch.float32, torch.float32, True),
    (torch.float64, torch.float64, False),
)


def _arg_type(value: object) -> str:
    """Triton's type for a launch argument, with the JIT's divisibility-by-16 specialisation."""
    if isinstance(value, Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    base = "i32" if -(2**31) <= value < 2**31 else "i64"
    return base + (":16" if value % 16 == 0 else "")


def _report_build(
    dtype: torch.dtype, w_dtype: torch.dtype, kernel: triton.JITFunction, launch: Launch,
    args: tuple, kw: dict,
) -> KernelBuild:
    """The KernelBuild of one recorded launch for x of ``dtype`` and weights of ``w_dtype``."""
    names = kernel.arg_names
    # Builds are for GPUs: the interpreter's bf16 workaround (widening dot operands) is off there.
    kw = kw | ({"DOT_FP32": False} if "DOT_FP32" in kw else {})
    values = dict(zip(names, args)) | launch.tiles | kw
    # The JIT turns integer arguments equal to 1 (unit strides) into constants.
    constexprs = {
        n: v for n, v in values.items()
        if n in launch.tiles or n in kw or (type(v) is int and v == 1)
    }
    signature = {n: "constexpr" if n in constexprs else _arg_type(values[n]) for n in names}
    label = [_TYPE_NAMES[dtype]] + ([f"W={_TYPE_NAMES[w_dtype]}"] if w_dtype != dtype else [])
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
        # X^T Y multiplies [BLOCK_P, BLOCK_K] x tiles; shrink and expand [BLOCK_M, *] row tiles;
        # X^T Y's plan and chunk reduction have no dot (0).
        dot_rows=launch.tiles.get("BLOCK_P", launch.tiles.get("BLOCK_M", 0)),
        dot_input="tf32" if kw.get("PRECISION") == "tf32" else _TYPE_NAMES[dtype],
    )


def _recorded_launches(
    dtype: torch.dtype, w_dtype: torch.dtype, allow_tf32: bool, n_tokens: int, deterministic: bool,
    arch: str,
) -> list[tuple]:
    """(kernel, launch, args, kwargs) of a forward and backward on meta tensors with ``arch``'s
    configs."""
    meta = dict(device=torch.device("meta"))
    width, k = REPORT_WIDTH, REPORT_SLOTS
    U = [torch.empty(n, width, r, dtype=w_dtype, **meta) for r, n in REPORT_RANK_COUNTS.items()]
    V = [torch.empty(n, r, width, dtype=w_dtype, **meta) for r, n in REPORT_RANK_COUNTS.items()]
    x = torch.empty(n_tokens, width, dtype=dtype, **meta)
    gates = torch.empty(n_tokens, k, dtype=accumulator_dtype(dtype), **meta)
    indices = torch.empty(n_tokens, k, dtype=torch.int64, **meta)
    b_dec = torch.empty(width, dtype=w_dtype, **meta)
    recorded: list[tuple] = []

    def record(kernel, grid, launch, *args, **kw) -> None:
        recorded.append((kernel, launch, args, kw))

    y, table, h_pre = forward(x, gates, indices, U, V, b_dec, allow_tf32, run=record,
                              deterministic=deterministic, arch=arch)
    backward(y, x, gates, table, U, V, h_pre, (True, True, True, True), allow_tf32, run=record,
             deterministic=deterministic, arch=arch)
    return recorded


def gpu_report_builds() -> list[KernelBuild]:
    """Every (kernel, config) the launch code picks at width 2304 for the paper's ranks, for each
    of REPORT_VARIANTS, every BLOCK_M, either combine and each architecture's configs, captured
    from a forward and backward on meta tensors; a config both architectures pick is one build
    for both."""
    builds: dict[tuple[str, str], KernelBuild] = {}
    for arch in GPU_ARCHS:
        for dtype, w_dtype, allow_tf32 in REPORT_VARIANTS:
            # Uniform routing: token counts whose segments pick every BLOCK_M.
            for n_tokens, deterministic in itertools.product((2 ** p for p in range(6, 18)),
                                                              (True, False)):
                for launch in _recorded_launches(dtype, w_dtype, allow_tf32, n_tokens,
                                                 deterministic, arch):
                    build = _report_build(dtype, w_dtype, *launch)
                    key = (build.name, build.config)
                    archs = builds[key].archs if key in builds else ()
                    if arch not in archs:
                        builds[key] = replace(build, archs=(*archs, arch))
    return list(builds.values())
