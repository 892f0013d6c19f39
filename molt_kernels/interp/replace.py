"""Swap a model's MLP modules for replacement layers (MOLTs, transcoders, ...) and back.

Paths are dotted submodule names as in ``model.named_modules()``: ``"encoder.layer.3.mlp"``
(our MiniLM; HF's ``BertModel`` splits its MLP over ``intermediate`` and ``output`` and has no
such module), ``"transformer.h.3.mlp"`` (HF GPT-2), ``"model.layers.3.mlp"`` (HF Llama).
ModuleList indices may also be written ``"h[3].mlp"`` and may be negative (``"h.-1.mlp"`` is
the last block). A replacement is any ``nn.Module`` mapping [..., d_in] -> [..., d_out] like
the module it replaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_BRACKET_INDEX = re.compile(r"\[(-?\d+)\]")


class ErrorTermReplacement(nn.Module):
    """Runs ``replacement`` but outputs exactly what ``original`` outputs.

    Forward value: ``original(x)`` bit for bit; gradient: that of ``replacement(x)`` (w.r.t.
    its parameters and ``x``). This is ``replacement(x) + (original(x) - replacement(x))``
    with the error term detached, written as ``y.detach() + (r - r.detach())`` so the value is
    exactly ``y`` (``y + 0``) instead of ``r + (y - r)``, which rounds. ``original`` runs
    under ``no_grad`` since its output is detached anyway.
    """

    def __init__(self, original: nn.Module, replacement: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.replacement = replacement

    def forward(self, x: Tensor) -> Tensor:
        r = self.replacement(x)
        with torch.no_grad():
            y = self.original(x)
        if r.shape != y.shape:
            raise ValueError(
                f"replacement output shape {tuple(r.shape)} != original MLP output shape "
                f"{tuple(y.shape)}"
            )
        return y + (r - r.detach())


def _child_name(parent: nn.Module, part: str, path: str, walked: list[str]) -> str:
    """Canonical name of ``parent``'s child ``part`` (negative list indices resolved)."""
    where = f"{'.'.join(walked) or 'the model'} ({type(parent).__name__})"
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if not -len(parent) <= idx < len(parent):
            raise AttributeError(
                f"no submodule at {path!r}: index {idx} out of range for {where} of "
                f"length {len(parent)}"
            )
        part = str(idx % len(parent))
    if parent._modules.get(part) is None:
        children = ", ".join(name for name, _ in parent.named_children()) or "none"
        raise AttributeError(
            f"no submodule at {path!r}: {where} has no child {part!r}; its children: {children}"
        )
    return part


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, canonical child name) of the submodule at ``path``."""
    parts = _BRACKET_INDEX.sub(r".\1", path).split(".")
    if "" in parts:
        raise ValueError(f"malformed module path {path!r}")
    parent, walked = model, []
    for part in parts[:-1]:
        name = _child_name(parent, part, path, walked)
        parent = parent._modules[name]
        walked.append(name)
    return parent, _child_name(parent, parts[-1], path, walked)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (bracket and negative indices allowed); clear error if none."""
    parent, name = _resolve(model, path)
    return parent._modules[name]


def replace_mlp(
    model: nn.Module, path: str, layer: nn.Module, error_term: bool = False
) -> nn.Module:
    """Install ``layer`` at ``path`` in place and return the module that was there.

    With ``error_term=True`` the installed module is ``ErrorTermReplacement(original, layer)``:
    the rest of the model sees the exact original output while gradients reach ``layer``.
    To undo, ``replace_mlp(model, path, original)`` with the returned module, or use
    ``replaced``. Raises ``AttributeError`` naming the path if there is no module there.
    """
    parent, name = _resolve(model, path)
    original = parent._modules[name]
    setattr(parent, name, ErrorTermReplacement(original, layer) if error_term else layer)
    return original


def _check_disjoint(paths: list[str], targets: list[tuple[nn.Module, str]]) -> None:
    # The same slot twice, or one target inside another, would make one replacement silently
    # ineffective (the outer swap takes the inner module out of the model).
    slots = [(id(parent), name) for parent, name in targets]
    modules = [parent._modules[name] for parent, name in targets]
    target_ids = {id(m) for m in modules}
    nested = any(id(sub) in target_ids for m in modules for sub in list(m.modules())[1:])
    if nested or len(set(slots)) < len(slots):
        raise ValueError(f"module paths overlap (same or nested modules): {paths}")


@contextmanager
def replaced(
    model: nn.Module, layers: Mapping[str, nn.Module], error_term: bool = False
) -> Iterator[nn.Module]:
    """Temporarily install ``layers`` ({path: replacement}); restore the originals on exit.

    All paths are checked before anything is swapped; on exit (also on an exception) every
    original module object is put back where it was, so the model is exactly as before.
    Yields ``model``.
    """
    targets = [_resolve(model, path) for path in layers]
    _check_disjoint(list(layers), targets)
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for (parent, name), layer in zip(targets, layers.values(), strict=True):
            original = parent._modules[name]
            setattr(parent, name, ErrorTermReplacement(original, layer) if error_term else layer)
            saved.append((parent, name, original))
        yield model
    finally:
        for parent, name, original in reversed(saved):
            setattr(parent, name, original)
