"""save_pretrained / from_pretrained storage shared by the layer modules: ``cfg.json`` (the
module kind and its config) plus ``model.safetensors`` (the state dict), as the SAE libraries do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
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


def read_layer(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (config dict, state dict) saved by :func:`save_layer`, checking the kind."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{cfg_file} has no 'config' entry")
    if meta.get("kind") != kind:
        raise ValueError(f"{cfg_file} holds a {meta.get('kind')!r}, not a {kind!r}")
    return meta["config"], load_file(str(weights_file))


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``module``; any missing, unexpected or mis-shaped tensor is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(t.shape)}, "
                f"the config expects {list(own[name].shape)}"
            )
    module.load_state_dict(state)


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
        config, state = read_layer(path, cls.KIND)
        # Built in the stored dtype, so that loading never rounds the weights.
        stored = next(iter(state.values())).dtype if state else None
        layer = cls(cls.CONFIG.from_dict(config), backend=backend, device="cpu", dtype=stored)
        load_state_strict(layer, state, str(path))
        return layer.to(device=device, dtype=dtype)
