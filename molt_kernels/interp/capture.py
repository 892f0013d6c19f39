"""Stream (mlp_in, mlp_out) activation pairs of one MLP module over a text corpus.

The core is model-agnostic: a forward hook on the module at ``mlp_path`` records its input and
output while ``model(**inputs)`` runs on a batch produced by ``prepare(texts) -> (inputs,
keep)``, and the tokens with ``keep`` True are kept. For a ``MiniLM`` the default ``prepare``
tokenises and keeps every non-padding token (and drops [CLS]/[SEP] unless asked not to). For
e.g. a HF model, pass ``prepare=lambda texts: (enc := tok(texts, padding=True,
return_tensors="pt"), enc["attention_mask"].bool())``.

On disk (``out_dir``): ``shard_00000.safetensors``, ... each holding ``mlp_in`` [n, d_in] and
``mlp_out`` [n, d_out] (model dtype, CPU), plus ``meta.json``; read back with
``iter_activation_shards`` or ``load_activations``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from molt_kernels.interp.activations import Prepare, forward_hookpoints
from molt_kernels.interp.models.minilm import MiniLM
from molt_kernels.interp.replace import get_module


def minilm_prepare(model: MiniLM, drop_special_tokens: bool = True) -> Prepare:
    """``prepare`` for a ``MiniLM``: padding is always dropped, [CLS]/[SEP] optionally."""

    def prepare(texts: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        batch = model.tokenize(texts, return_special_tokens_mask=True)
        special = batch.pop("special_tokens_mask").bool()
        keep = batch["attention_mask"].bool()
        return batch, keep & ~special if drop_special_tokens else keep

    return prepare


def _take(pairs: Iterable[tuple[Tensor, Tensor]], limit: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncate a stream of pairs to ``limit`` >= 1 tokens, pulling no batch beyond it."""
    left = limit
    for x, y in pairs:
        yield x[:left], y[:left]
        left -= len(x)
        if left <= 0:
            return


def _rebatch(pairs: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Re-cut a stream of pairs into batches of exactly ``size`` tokens (the last may be short)."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    n = 0
    for x, y in pairs:
        xs.append(x)
        ys.append(y)
        n += len(x)
        while n >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, n = [x_all[size:]], [y_all[size:]], n - size
    if n:
        yield torch.cat(xs), torch.cat(ys)


class _ShardWriter:
    def __init__(self, out_dir: Path, mlp_path: str, shard_tokens: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.mlp_path, self.shard_tokens = out_dir, mlp_path, shard_tokens
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.n_pending = 0
        self.shards: list[dict[str, Any]] = []
        self.dims: tuple[int, int, str] | None = None

    def add(self, x: Tensor, y: Tensor) -> None:
        self.pending.append((x.cpu(), y.cpu()))
        self.n_pending += len(x)
        self.dims = (x.shape[-1], y.shape[-1], str(x.dtype).removeprefix("torch."))
        if self.n_pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.n_pending:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        tensors = {
            "mlp_in": torch.cat([x for x, _ in self.pending]).contiguous(),
            "mlp_out": torch.cat([y for _, y in self.pending]).contiguous(),
        }
        save_file(tensors, str(self.out_dir / name))
        self.shards.append({"file": name, "n_tokens": self.n_pending})
        self.pending, self.n_pending = [], 0

    def close(self, complete: bool) -> None:
        self.flush()
        d_in, d_out, dtype = self.dims or (None, None, None)
        meta = {
            "mlp_path": self.mlp_path,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "d_in": d_in,
            "d_out": d_out,
            "dtype": dtype,
            "complete": complete,
            "shards": self.shards,
        }
        (self.out_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def capture_mlp_activations(
    model: nn.Module,
    mlp_path: str,
    texts: Iterable[str],
    *,
    batch_size_texts: int = 32,
    max_tokens: int | None = None,
    tokens_per_batch: int | None = None,
    drop_special_tokens: bool = True,
    prepare: Prepare | None = None,
    stop_after_mlp: bool = True,
    out_dir: str | Path | None = None,
    shard_tokens: int = 65536,
    progress: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(mlp_in [n, d_in], mlp_out [n, d_out])`` of the module at ``mlp_path``.

    Rows are the kept tokens (never padding) in text order, detached, in the model's dtype and
    on its device; batches without kept tokens are skipped. Arguments are checked at once; the
    model runs (under ``torch.no_grad``) only as the iterator is consumed.

    Args:
        model: the model; called as ``model(**inputs)``.
        mlp_path: dotted path of the MLP module (see ``molt_kernels.replace``), e.g.
            ``minilm_mlp_path(3)``.
        texts: any iterable of strings, consumed lazily (e.g. ``data.iter_texts()``).
        batch_size_texts: texts per forward pass.
        max_tokens: stop after this many tokens in total (the last batch is cut).
        tokens_per_batch: if set, yield batches of exactly this many tokens (the last may be
            short); otherwise one batch per forward pass.
        drop_special_tokens: for the default ``prepare`` of a ``MiniLM``: drop [CLS]/[SEP].
        prepare: texts -> (model kwargs, keep mask [B, T]); required unless model is a MiniLM.
        stop_after_mlp: abort each forward right after the MLP (the later layers are not
            needed); set False if the model must run to the end, e.g. for other hooks.
        out_dir: also write shards + ``meta.json`` there (must not hold a capture already).
            Written completely once the iterator is exhausted or closed.
        shard_tokens: tokens per shard file (at least; shards are cut between batches).
        progress: show a tqdm bar counting tokens.
    """
    for arg, value in (
        ("batch_size_texts", batch_size_texts),
        ("max_tokens", max_tokens),
        ("tokens_per_batch", tokens_per_batch),
        ("shard_tokens", shard_tokens),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    if prepare is None:
        if not isinstance(model, MiniLM):
            raise TypeError(f"capture_mlp_activations needs prepare= for a {type(model).__name__}")
        prepare = minilm_prepare(model, drop_special_tokens)
    get_module(model, mlp_path)  # fail now on a bad path, not at the first batch
    if out_dir is not None:
        out_dir = Path(out_dir)
        if any(out_dir.glob("shard_*.safetensors")) or (out_dir / "meta.json").exists():
            raise FileExistsError(f"{out_dir} already holds captured activations")

    def per_forward() -> Iterator[tuple[Tensor, Tensor]]:
        it = iter(texts)
        # no_grad and the hook only around each forward (inside forward_hookpoints): the
        # consumer runs between yields (and may run the model itself), so neither may leak.
        while batch := list(islice(it, batch_size_texts)):
            x, y = forward_hookpoints(model, [mlp_path], prepare, batch, stop_after_mlp)[mlp_path]
            if len(x):
                yield x, y

    def run() -> Iterator[tuple[Tensor, Tensor]]:
        writer = _ShardWriter(out_dir, mlp_path, shard_tokens) if out_dir is not None else None
        complete = False
        try:
            with tqdm(
                total=max_tokens, unit="tok", desc=f"capture {mlp_path}", disable=not progress
            ) as bar:
                pairs = per_forward()
                if max_tokens is not None:
                    pairs = _take(pairs, max_tokens)
                if tokens_per_batch is not None:
                    pairs = _rebatch(pairs, tokens_per_batch)
                for x, y in pairs:
                    if writer is not None:
                        writer.add(x, y)
                    bar.update(len(x))
                    yield x, y
            complete = True
        finally:
            if writer is not None:
                writer.close(complete)

    return run()


def iter_activation_shards(out_dir: str | Path) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(mlp_in [n, d_in], mlp_out [n, d_out])`` per shard written by a capture."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    for shard in meta["shards"]:
        tensors = load_file(str(out_dir / shard["file"]))
        yield tensors["mlp_in"], tensors["mlp_out"]


def load_activations(out_dir: str | Path) -> tuple[Tensor, Tensor]:
    """All pairs captured in ``out_dir``, concatenated: (mlp_in [N, d_in], mlp_out [N, d_out])."""
    pairs = list(iter_activation_shards(out_dir))
    if not pairs:
        raise ValueError(f"{out_dir} holds no captured tokens")
    xs, ys = zip(*pairs, strict=True)
    return torch.cat(xs), torch.cat(ys)
