"""The kernel registry the gpu-report compiles: one KernelBuild per (kernel, launch config).

Each op folder with Triton kernels has a ``builds.py`` whose ``gpu_report_builds()`` returns the
builds its launch code can use, for example::

    KernelBuild(
        name="gate_topk_fwd",
        config=f"BLOCK_N={bn},BLOCK_T=128,w4s3",
        fn=_gate_topk_fwd_kernel,  # the bare @triton.jit function, not an autotuner
        signature={"x": "*bf16", "w": "*bf16", "out": "*i64", "M": "i32",
                   "stride_x": "i32:16", "BLOCK_N": "constexpr", "BLOCK_T": "constexpr"},
        constexprs={"BLOCK_N": bn, "BLOCK_T": 128},
        num_warps=4,
        num_stages=3,
    )

``signature`` names every parameter of ``fn``. At launch the JIT specialises arguments that are
multiples of 16 (pointers to torch allocations, most strides), and vectorised loads, cp.async and
hence pipelined shared memory depend on it, so the report must see the same hints: pointers are
compiled as 16-byte aligned, and an integer type takes the suffix ``:16`` ("i32:16", the notation
of Triton's AOT compiler) where the launch code guarantees a multiple of 16. Without it a strided
tile compiles unpipelined and its shared memory is under-reported.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import triton


@dataclass(frozen=True)
class KernelBuild:
    """One (kernel, launch config) that the package's launch code can use."""

    name: str                      # kernel name, e.g. "gate_topk_fwd"
    config: str                    # human label of the launch config, e.g. "BLOCK_N=64,w4s3"
    fn: triton.JITFunction
    signature: dict[str, str]      # every parameter of fn -> triton type ("*bf16", "i32:16", ...)
    constexprs: dict[str, object]  # values of the constexpr parameters
    num_warps: int = 4
    num_stages: int = 3
    # What its tl.dot tiles multiply, for the gpu-report's wgmma check: rows (M) of the dot's
    # output tile (0: no tl.dot) and its operand type ("bf16", "fp16", "tf32", "fp32", "fp64").
    dot_rows: int = 0
    dot_input: str = ""
    # Config families (``configs.arch_of``) whose launch code picks this build; the gpu-report
    # compiles it for the targets of these families only (sm_86/89 belong to sm_80's).
    archs: tuple[str, ...] = ("sm_80", "sm_90")


def collect_builds() -> list[KernelBuild]:
    """Every build from ``gpu_report_builds()`` of each ``molt_kernels.ops.<op>.builds``; an import
    error there propagates (and fails the report)."""
    import molt_kernels.ops as ops

    # A folder scan rather than pkgutil.iter_modules, which skips op folders without __init__.py.
    op_names = sorted({
        entry.name
        for folder in ops.__path__
        for entry in Path(folder).iterdir()
        if entry.is_dir() and entry.name.isidentifier() and not entry.name.startswith("__")
    })
    builds: list[KernelBuild] = []
    for op in op_names:
        module_name = f"{ops.__name__}.{op}.builds"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        if not hasattr(module, "gpu_report_builds"):
            raise AttributeError(f"{module_name} defines no gpu_report_builds()")
        builds.extend(module.gpu_report_builds())
    return builds
