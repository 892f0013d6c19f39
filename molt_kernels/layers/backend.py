"""Backend choice: ``reference`` (dense, naive), ``torch`` (sparse PyTorch), ``triton`` (fused).

Precedence: an explicit ``backend=`` argument, then ``$MOLT_KERNELS_BACKEND``, then the default:
triton for CUDA tensors when its kernels are available, torch otherwise. The triton backend runs on
CPU tensors only under ``TRITON_INTERPRET=1`` (that is how its tests run without a GPU).
"""

from __future__ import annotations

import os

import torch

from ..ops.runtime import triton_importable, triton_interpreting

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "MOLT_KERNELS_BACKEND"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the triton backend can execute on tensors of ``device``."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def available_backends(device: torch.device) -> tuple[str, ...]:
    names = ["reference", "torch"]
    if triton_runs_on(device):
        names.append("triton")
    return tuple(names)


def check_backend_name(backend: str | None, name: str = "backend") -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS} or None, got {backend!r}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: explicit argument, then the environment, then default."""
    check_backend_name(backend)
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        check_backend_name(backend, f"${ENV_VAR}")
    if backend is None:
        return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if backend == "triton" and not triton_runs_on(device):
        why = (
            "triton is not installed"
            if not triton_importable()
            else f"tensors are on {device.type}; use CUDA tensors or set TRITON_INTERPRET=1"
        )
        raise ValueError(f"backend 'triton' cannot run here: {why}")
    return backend
