"""Argument checks shared by the functional ops, the layers and the configs: each error names the
argument and what was expected. The ops' internals trust their inputs once these have run."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from .gate_topk.activation import ACTIVATIONS


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_positive_float(name: str, value: object) -> None:
    """value is a finite real number > 0 (an int or float; not a bool, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def check_k(k: object, n_transforms: int, units_name: str = "T") -> None:
    """k is None (gate by the activation alone) or an int in [1, n_transforms]."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int or None, got {type(k).__name__}")
    if not 1 <= k <= n_transforms:
        raise ValueError(f"k must be in [1, {units_name}={n_transforms}] or None, got {k}")


def check_activation(activation: object) -> None:
    """activation is one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_gate_activation(activation: object, log_threshold: object) -> None:
    """A known activation; jumprelu comes with its log_threshold."""
    check_activation(activation)
    if activation == "jumprelu" and log_threshold is None:
        raise ValueError("activation 'jumprelu' needs log_threshold [T]")


def check_tensor(name: str, t: object, shape: tuple[int | None, ...], device: torch.device) -> None:
    """t is a floating tensor on ``device`` of ``shape`` (None: any size along that dim)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: move them to one device")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_x(x: object, d_in: int) -> None:
    """x is a floating tensor [..., d_in]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must have shape [..., d_in={d_in}], got {list(x.shape)}")


def check_indices(
    x: Tensor,
    values: Tensor,
    values_name: str,
    indices: Tensor,
    n_units: int,
    units_name: str,
    distinct: bool = False,
) -> None:
    """Check values [..., k] (floating) and indices [..., k] int64 beside x [..., d], ids in
    [0, n_units) and, with ``distinct``, no id twice within a row (the MOLT decode: its gates
    are a selection, and summing a repeated transform, keeping one copy and per-bucket row
    capacities would all disagree, so a repeat is rejected).

    On the CPU outside torch.compile these are ValueErrors; on CUDA, or while compiling, they are
    one device-side assert: a host check would synchronise the hot path and break graphs."""
    check_tensor(values_name, values, tuple(x.shape[:-1]) + (None,), x.device)
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
        raise TypeError(
            f"indices must be an int64 tensor, got {getattr(indices, 'dtype', indices)}"
        )
    if indices.shape != values.shape or indices.device != x.device:
        raise ValueError(
            f"indices must match {values_name}: shape {list(values.shape)} on {x.device}, "
            f"got {list(indices.shape)} on {indices.device}"
        )
    if torch.compiler.is_compiling():
        _check_index_values(indices, n_units, units_name, distinct)
    else:
        _IndexValueCheck.apply(indices, n_units, units_name, distinct)


def _check_index_values(indices: Tensor, n_units: int, units_name: str, distinct: bool) -> None:
    """The value checks of ``check_indices``."""
    if indices.numel() == 0:
        return
    range_message = f"indices must lie in [0, {units_name}={n_units})"
    distinct_message = "indices must hold distinct ids within each row (a repeated id was found)"
    if distinct:
        # Each sorted row framed by -1 and n_units increases strictly iff its ids lie in range
        # and none repeats: one check, in a few ops (the step's op count is a target).
        ordered = indices.reshape(-1, indices.shape[-1]).sort(dim=-1).values
        framed = F.pad(F.pad(ordered, (1, 0), value=-1), (0, 1), value=n_units)
        valid = (framed.diff(dim=-1) > 0).all()
    else:
        low, high = indices.aminmax()
        valid = (low >= 0) & (high < n_units)
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid):
            in_range = bool(((indices >= 0) & (indices < n_units)).all())
            raise ValueError(distinct_message if in_range else range_message)
    else:
        suffix = ", distinct within each row" if distinct else ""
        torch._assert_async(valid, range_message + suffix)


class _IndexValueCheck(Function):
    """``_check_index_values`` under torch.func.vmap too: the checks are per row, so the batch
    rule checks the whole physical tensor (a Python branch on a batched value is impossible)."""

    @staticmethod
    def forward(indices: Tensor, n_units: int, units_name: str, distinct: bool) -> Tensor:
        _check_index_values(indices, n_units, units_name, distinct)
        return indices.new_empty(0)  # a Function returns a tensor

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def vmap(info, in_dims, indices, n_units, units_name, distinct):
        _check_index_values(indices.movedim(in_dims[0], 0), n_units, units_name, distinct)
        return indices.new_empty(0), None
