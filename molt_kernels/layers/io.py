"""save_pretrained / from_pretrained storage shared by the layer modules: ``cfg.json`` (the
module kind and its config) plus ``model.safetensors`` (the state dict), as the SAE libraries do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def save_layer(
    path: str | Path, kind: str, config: dict[str, Any], module: torch.nn.Module
) -> Path:
    """Write ``cfg.json`` and ``model.safetensors`` for ``module`` into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"kind": kind})
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": config}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


# safetensors dtype names a layer may be stored in; anything else (integers, bool, fp8) is refused.
_STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                  "F64": torch.float64}


def read_config(path: str | Path, kind: str) -> dict[str, Any]:
    """The config dict of a directory written by :func:`save_layer`, after checking cfg.json's
    structure (an object with kind, format_version and a config object) and that both files
    exist. Nothing is allocated; the weights are not opened."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("kind") != kind:
        raise ValueError(f"{cfg_file} holds a {meta.get('kind')!r}, not a {kind!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format_version {version!r} is not supported (this molt_kernels reads "
            f"format_version {FORMAT_VERSION})"
        )
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file}: 'config' must be a JSON object, got {config!r}")
    return config


def check_weights_header(path: str | Path, expected: dict[str, torch.Size]) -> torch.dtype:
    """Check model.safetensors' header against ``expected`` {name: shape} without reading any
    tensor: the same names, those shapes, one floating dtype for all. Returns that dtype."""
    weights_file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            header = {n: (f.get_slice(n).get_dtype(), f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{weights_file} is not a readable safetensors file: {e}") from e
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file}: missing tensors {missing}, unexpected {unexpected}")
    dtypes = {dtype for dtype, _ in header.values()}
    if not dtypes <= set(_STORED_DTYPES) or len(dtypes) > 1:
        raise ValueError(
            f"{weights_file}: tensors must share one floating dtype of {sorted(_STORED_DTYPES)}, "
            f"got {sorted(dtypes)}"
        )
    for name, (_, shape) in header.items():
        if list(shape) != list(expected[name]):
            raise ValueError(
                f"{weights_file}: tensor {name!r} has shape {list(shape)}, "
                f"the config expects {list(expected[name])}"
            )
    return _STORED_DTYPES[dtypes.pop()] if dtypes else torch.float32


class PretrainedLayer:
    """``save_pretrained`` / ``from_pretrained`` for a layer module that has ``cfg`` (with
    ``to_dict``/``from_dict``) and is built as ``cls(cfg, backend=, device=, dtype=)``."""

    KIND: ClassVar[str]
    CONFIG: ClassVar[type]

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``model.safetensors`` into directory ``path``."""
        return save_layer(path, self.KIND, self.cfg.to_dict(), self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Load a layer written by :meth:`save_pretrained`, then move it to device / dtype."""
        cfg = cls.CONFIG.from_dict(read_config(path, cls.KIND))
        # The expected tensors come from a layer on the meta device (nothing allocated), so a
        # small cfg.json naming a huge layer fails here, before any memory is touched.
        expected = {n: t.shape for n, t in cls(cfg, device="meta").state_dict().items()}
        stored = check_weights_header(path, expected)
        # Built in the stored dtype, so that loading never rounds the weights.
        layer = cls(cfg, backend=backend, device="cpu", dtype=stored)
        layer.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
        return layer.to(device=device, dtype=dtype)
