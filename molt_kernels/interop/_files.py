"""Reading peer files with errors that name the file and what was expected."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..layers.config import MOLTConfig


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; FileNotFoundError / ValueError otherwise."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        obj = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a JSON file: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(obj).__name__}")
    return obj


def write_json(file: Path, obj: Mapping[str, Any]) -> None:
    file.write_text(json.dumps(obj, indent=4) + "\n")


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """Every tensor in ``file``, on the CPU, in its stored dtype."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a safetensors file: {e}") from e


def write_safetensors(file: Path, tensors: Mapping[str, Tensor]) -> None:
    state = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(state, str(file), metadata={"format": "pt", "written_by": "molt_kernels"})


def check_keys(source: str, tensors: Mapping[str, Tensor], expected: Iterable[str]) -> None:
    """Exactly the ``expected`` tensor names, as a strict state-dict load wants them."""
    expected = set(expected)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")


def check_shape(source: str, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{source}: tensor {name!r} must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{source}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        )


def field(source: str, obj: Mapping[str, Any], name: str, kind: type | tuple, default: Any = ...):
    """``obj[name]`` checked against ``kind`` (bool is not an int here); ``default`` if absent."""
    if name not in obj:
        if default is ...:
            raise ValueError(f"{source}: missing field {name!r}")
        return default
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{source}: field {name!r} must be {want}, got {value!r}")
    return value


def positive_int(source: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
    return value


def positive_finite(source: str, name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source}: {name} must be finite and > 0, got {value!r}")
    return value


def common_dtype(source: str, tensors: Iterable[Tensor]) -> torch.dtype:
    """The one floating dtype of ``tensors``: a layer holds a single dtype."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{source}: tensors mix dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def config_or_error(source: str, **fields: Any) -> MOLTConfig:
    """The MOLTConfig a file describes; its validation errors name the file."""
    try:
        return MOLTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
