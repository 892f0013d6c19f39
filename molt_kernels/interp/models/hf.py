"""Hugging Face ``transformers`` models for the trainer and the capture tools (optional).

``transformers`` is imported only when a model is loaded, so the package works without it
(``pip install 'molt_kernels[hf]'`` adds it). Hookpoints are plain module paths, found the same way
on any model (ours or a transformers one) by :func:`find_mlp_paths`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from molt_kernels.interp.activations import Prepare

MLP_NAMES = ("mlp", "feed_forward", "ffn")
_BLOCK_MLP = re.compile(r"^(?P<blocks>.+)\.(?P<index>\d+)\.(?P<name>[^.]+)$")


def find_mlp_paths(model: nn.Module) -> list[str]:
    """Module paths of the per-block MLPs, in block order: ``<blocks>.<i>.<name>`` where
    ``<blocks>`` is an ``nn.ModuleList`` and ``<name>`` one of ``MLP_NAMES`` (``mlp`` in GPT-2,
    Llama, Qwen, Mistral, GPT-NeoX and our MiniLM). The first block list that has them wins
    (the encoder of an encoder-decoder). Raises ValueError naming the model if there are none."""
    modules = dict(model.named_modules())
    found: dict[str, list[tuple[int, str]]] = {}
    for path in modules:
        m = _BLOCK_MLP.match(path)
        if m and m["name"] in MLP_NAMES and isinstance(modules.get(m["blocks"]), nn.ModuleList):
            found.setdefault(m["blocks"], []).append((int(m["index"]), path))
    if not found:
        raise ValueError(
            f"no per-block MLP module ({'/'.join(MLP_NAMES)} inside an nn.ModuleList of blocks) "
            f"in {type(model).__name__}: name the hookpoints by module path instead"
        )
    return [path for _, path in sorted(next(iter(found.values())))]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "loading a Hugging Face model needs 'transformers': pip install 'molt_kernels[hf]'"
        ) from e
    return transformers


def load_hf_model(
    name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a transformers model name or local directory, frozen, in eval mode.

    The model is the bare ``AutoModel`` (no LM head: hookpoints sit in the blocks). A tokenizer
    without a pad token pads with its EOS (or UNK) token; the keep mask drops padding anyway.
    """
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = transformers.AutoModel.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device).eval().requires_grad_(False), tokenizer


def hf_prepare(
    tokenizer: Any,
    device: torch.device | str = "cpu",
    max_length: int = 256,
    drop_special_tokens: bool = True,
) -> Prepare:
    """``prepare`` for a transformers tokenizer: pads, truncates to ``max_length``, keeps real
    tokens (never padding) and, with ``drop_special_tokens``, drops BOS / EOS / [CLS] / [SEP]."""

    def prepare(texts: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        enc = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask").bool()
        keep = enc["attention_mask"].bool()
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return inputs, keep & ~special if drop_special_tokens else keep

    return prepare
