"""The CPU extension: the decode of csrc/lowrank_mixture_cpu.cpp and the gate's top-k selection of
csrc/gate_topk_cpu.cpp, built on first use.

The extension is compiled with torch.utils.cpp_extension.load the first time it is asked for (then
cached in torch's extension directory, ``TORCH_EXTENSIONS_DIR``) and registers
``torch.ops.molt_kernels.lowrank_mixture_cpu`` and ``..._backward``: each phase of a step is one
parallel region of single-threaded GEMMs on gathered rows (see the source's header), instead of
hundreds of small multi-threaded ATen ops; and ``torch.ops.molt_kernels.topk_lowest_index_cpu``,
the gate's tie-exact top-k in one pass per row (used by ``gate_topk.pytorch``). It uses torch's
intra-op thread count and changes no process-wide thread state.

Without a C++ compiler or the csrc/ sources :func:`load_extension` returns None, and with
``MOLT_KERNELS_CPU_EXTENSION=0`` in the environment it is not used: the torch backend then runs
the pure-PyTorch decode of ``pytorch.py`` (same results up to rounding; both deterministic).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from types import ModuleType

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..extension import build, missing_sources

log = logging.getLogger(__name__)

SOURCES = ("lowrank_mixture_cpu.cpp", "gate_topk_cpu.cpp")
EXTENSION_NAME = "molt_kernels_lowrank_mixture_cpu"
DISABLE_ENV = "MOLT_KERNELS_CPU_EXTENSION"
# dtypes the kernel computes in; others (half inputs are upcast before the decode) use pytorch.py.
DTYPES = (torch.float32, torch.float64)


def unavailable_reason() -> str | None:
    """Why the extension cannot be used here, or None if it can be tried."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH; set CXX)"
    return missing_sources(SOURCES)


@functools.cache
def load_extension() -> ModuleType | None:
    """``torch.ops.molt_kernels`` with the CPU decode built and loaded, or None.

    None means: use the pure-PyTorch decode; the reason is logged once, as a warning when a build
    failed, at info level when it was disabled or no compiler is there. Cached: one attempt per
    process (the first one compiles, about a minute; later processes load the cached build).
    """
    reason = unavailable_reason()
    if reason is not None:
        log.info("CPU decode extension unavailable, using the PyTorch decode: %s", reason)
        return None
    if not build(EXTENSION_NAME, SOURCES, log, "the PyTorch decode", **_build_flags()):
        return None
    torch.library.register_fake("molt_kernels::lowrank_mixture_cpu")(_forward_fake)
    torch.library.register_fake("molt_kernels::lowrank_mixture_cpu_backward")(_backward_fake)
    torch.library.register_fake("molt_kernels::topk_lowest_index_cpu")(_topk_fake)
    ops = torch.ops.molt_kernels
    register_flop_formula(ops.lowrank_mixture_cpu)(_forward_flops)
    register_flop_formula(ops.lowrank_mixture_cpu_backward)(_backward_flops)
    return ops


def _build_flags() -> dict[str, list[str]]:
    """Compiler and linker flags. ATen's ``at::parallel_for`` is a header template that runs its
    body on ONE thread unless the including file is compiled with OpenMP (``_OPENMP``), so the
    extension must be built with it whenever torch was: without it every "parallel" phase is
    serial. The link resolves to the libgomp.so.1 that torch has already loaded (same soname), so
    the process keeps one OpenMP thread pool."""
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    return {"extra_cflags": ["-O3", *openmp], "extra_ldflags": openmp}


@torch.compiler.assume_constant_result
def extension_enabled() -> bool:
    """True unless ``MOLT_KERNELS_CPU_EXTENSION=0`` or the extension cannot be built (read on
    every call, so the switch works at any time; a constant under torch.compile)."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and load_extension() is not None


def usable_for(x: Tensor) -> bool:
    """Whether the extension runs on x: on the CPU in fp32 / fp64, extension built."""
    return x.device.type == "cpu" and x.dtype in DTYPES and extension_enabled()


def _forward_fake(
    x: Tensor, gates: Tensor, indices: Tensor, U: list[Tensor], V: list[Tensor], b_dec: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shapes for torch.compile: h_pre's length (sum of r_t over routed pairs) is data-dependent."""
    n_transforms = sum(v.shape[0] for v in V)
    h_len = torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(x.shape[0], U[0].shape[1]),
        indices.new_empty(indices.numel()),
        indices.new_empty(n_transforms + 1),
        x.new_empty(h_len),
    )


def _topk_fake(values: Tensor, k: int) -> Tensor:
    return values.new_empty(values.shape[0], k, dtype=torch.int64)


def _backward_fake(
    grad_y: Tensor,
    x: Tensor,
    gates: Tensor,
    row_pair: Tensor,
    t_offsets: Tensor,
    U: list[Tensor],
    V: list[Tensor],
    h_pre: Tensor,
    need_x: bool,
    need_gates: bool,
    need_U: bool,
    need_V: bool,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(gates) if need_gates else gates.new_empty(0),
        [torch.empty_like(u) for u in U] if need_U else [],
        [torch.empty_like(v) for v in V] if need_V else [],
    )


# FLOPs for torch.utils.flop_counter.FlopCounterMode (registered when the extension loads; a mode
# created before that does not see them). h_pre holds sum over routed pairs of r_t
# values, so 2 * len(h_pre) FLOPs per unit of width for each GEMM of the decode.
def _forward_flops(x_shape, gates_shape, indices_shape, U_shapes, V_shapes, b_shape, out_shape):
    h_len = out_shape[3][0]
    return 2 * h_len * (x_shape[1] + U_shapes[0][1])  # shrink (d_in) + expand (d_out)


def _backward_flops(
    grad_y_shape,
    x_shape,
    gates_shape,
    row_pair_shape,
    t_offsets_shape,
    U_shapes,
    V_shapes,
    h_pre_shape,
    *_flags,
    out_shape,
):
    d_in, d_out = x_shape[1], grad_y_shape[1]
    return 2 * h_pre_shape[0] * 2 * (d_in + d_out)  # dH, dU (d_out); dV, dx (d_in)
