"""Activations on the fly for training: hookpoints by module path, a text stream split into data
shards, forward passes that yield one row per kept token, and a shuffling buffer of bounded size.

Row layout. One forward pass records the (input, output) of every hooked module; a kept token
becomes one row ``[x_1 | y_1 | x_2 | y_2 | ...]`` (``RowLayout`` splits it again), so the tokens
of all hookpoints stay aligned through the shuffle and one buffer serves every layer.

Data shards. Training texts (held-out texts removed) are numbered ``0, 1, 2, ...`` over endless
epochs; shard ``s`` of ``S`` reads the texts whose number is ``s`` mod ``S``. A shard's position
is the number of its next text, so a checkpoint can record where each shard stands and a resumed
run can skip ahead without running the model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from molt_kernels.interp.replace import get_module

Prepare = Callable[[list[str]], tuple[dict[str, Tensor], Tensor]]
"""texts -> (keyword arguments of ``model``, keep mask [B, T] bool over token positions)."""


class StopForward(Exception):
    """Raised by a hook to skip the layers after the last hookpoint."""


class Hookpoints:
    """Context manager recording the (input, output) of the first call of each module at ``paths``.

    ``records[path] = (x, y)`` with the model's own tensors (leading dims as the model has them).
    With ``stop=True`` the forward pass is aborted (and the abort swallowed on exit) as soon as
    every hookpoint has been recorded: the layers after the last one are never run.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], stop: bool = True) -> None:
        if not paths:
            raise ValueError("paths must name at least one module")
        if len(set(paths)) != len(paths):
            raise ValueError(f"paths must be distinct, got {list(paths)}")
        self.modules = {path: get_module(model, path) for path in paths}
        self.stop = stop
        self.records: dict[str, tuple[Tensor, Tensor]] = {}

    def __enter__(self) -> Hookpoints:
        self.records = {}
        self.handles = [
            module.register_forward_hook(self._hook(path), with_kwargs=True)
            for path, module in self.modules.items()
        ]
        return self

    def __exit__(self, *exc: object) -> bool:
        for handle in self.handles:
            handle.remove()
        return exc[0] is StopForward  # swallow our own early exit, nothing else

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if path not in self.records:
                x = args[0] if args else next(iter(kwargs.values()))
                y = output[0] if isinstance(output, tuple) else output
                self.records[path] = (x, y)
            if self.stop and len(self.records) == len(self.modules):
                raise StopForward

        return hook


def forward_hookpoints(
    model: nn.Module, paths: Sequence[str], prepare: Prepare, texts: list[str], stop: bool = True
) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``model`` on ``texts`` under ``no_grad``; ``{path: (x [n, d_in], y [n, d_out])}``.

    Rows are the tokens that ``prepare``'s keep mask selects, in text order, detached, in the
    model's dtype and on its device (n may be 0).
    """
    inputs, keep = prepare(texts)
    with torch.no_grad(), Hookpoints(model, paths, stop) as hooks:
        model(**inputs)
    out = {}
    for path in paths:
        if path not in hooks.records:
            raise RuntimeError(f"the module at {path!r} was not called by the model")
        x, y = hooks.records[path]
        if x.shape[:-1] != keep.shape or y.shape[:-1] != keep.shape:
            raise ValueError(
                f"keep mask {tuple(keep.shape)} does not match the input {tuple(x.shape)} / "
                f"output {tuple(y.shape)} of {path!r}"
            )
        mask = keep.to(x.device)
        out[path] = (x[mask], y[mask])
    return out


@dataclass(frozen=True)
class RowLayout:
    """Columns of a buffer row: ``[x_1 | y_1 | x_2 | y_2 | ...]`` for ``paths`` in order."""

    paths: tuple[str, ...]
    d_in: tuple[int, ...]
    d_out: tuple[int, ...]

    @property
    def width(self) -> int:
        return sum(self.d_in) + sum(self.d_out)

    def join(self, pairs: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """{path: (x [n, d_in], y [n, d_out])} -> rows [n, width]."""
        return torch.cat([t for path in self.paths for t in pairs[path]], dim=1)

    def split(self, rows: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """rows [n, width] -> {path: (x [n, d_in], y [n, d_out])} (views)."""
        widths = [w for pair in zip(self.d_in, self.d_out) for w in pair]
        parts = rows.split(widths, dim=1)
        return {p: (parts[2 * i], parts[2 * i + 1]) for i, p in enumerate(self.paths)}


class TextStream:
    """Endless training texts: epoch ``e`` is ``epoch_texts(e)``, held-out texts removed.

    A text is held out when ``crc32(text) % heldout_every == 0`` (about one in
    ``heldout_every``; ``0`` holds out nothing): a property of the text itself, so the held-out
    set is the same in every epoch, shard and process, and never trained on.
    """

    def __init__(self, epoch_texts: Callable[[int], Iterable[str]], heldout_every: int = 0):
        if heldout_every < 0 or heldout_every == 1:
            raise ValueError(f"heldout_every must be 0 or >= 2, got {heldout_every}")
        self.epoch_texts = epoch_texts
        self.heldout_every = heldout_every

    def is_heldout(self, text: str) -> bool:
        every = self.heldout_every
        return every > 0 and zlib.crc32(text.encode()) % every == 0

    def heldout(self) -> Iterator[str]:
        """The held-out texts of epoch 0, in order."""
        return (t for t in self.epoch_texts(0) if self.is_heldout(t))

    def shard(self, shard: int, n_shards: int, start: int = 0) -> Iterator[tuple[int, str]]:
        """(number, text) of the training texts with number >= start and number % n_shards ==
        shard. Skipping to ``start`` reads the texts but runs nothing."""
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard must be in [0, n_shards={n_shards}), got {shard}")
        number, epoch = 0, 0
        while True:
            seen = 0
            for text in self.epoch_texts(epoch):
                if self.is_heldout(text):
                    continue
                seen += 1
                if number >= start and number % n_shards == shard:
                    yield number, text
                number += 1
            if seen == 0:
                raise ValueError(f"epoch {epoch} of the text source has no training text")
            epoch += 1


class ActivationSource:
    """Forward passes over one data shard. :meth:`forward` reads ``sort_window *
    texts_per_forward`` texts, sorts them by length and runs the model on groups of
    ``texts_per_forward`` (texts of similar length pad less: on the pydoc topics, unsorted
    batches of 32 are 58% padding), returning the kept tokens of all of them. ``position`` is the
    number of the shard's next unread text (see :meth:`TextStream.shard`)."""

    def __init__(
        self,
        model: nn.Module,
        layout_paths: Sequence[str],
        prepare: Prepare,
        texts: TextStream,
        shard: int,
        n_shards: int,
        texts_per_forward: int,
        position: int = 0,
        sort_window: int = 4,
    ) -> None:
        if texts_per_forward < 1 or sort_window < 1:
            raise ValueError(
                f"texts_per_forward and sort_window must be >= 1, got {texts_per_forward}, "
                f"{sort_window}"
            )
        self.model, self.paths, self.prepare = model, list(layout_paths), prepare
        self.texts_per_forward, self.sort_window = texts_per_forward, sort_window
        self.position = position
        self._texts = texts.shard(shard, n_shards, position)

    def forward(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The next window of texts: {path: (x [n, d_in], y [n, d_out])}."""
        window = list(islice(self._texts, self.sort_window * self.texts_per_forward))
        self.position = window[-1][0] + 1
        texts = sorted((t for _, t in window), key=len)  # stable: ties keep stream order
        size = self.texts_per_forward
        parts = [
            forward_hookpoints(self.model, self.paths, self.prepare, texts[i : i + size])
            for i in range(0, len(texts), size)
        ]
        return {
            p: tuple(torch.cat([part[p][i] for part in parts]) for i in (0, 1)) for p in self.paths
        }


def collect_rows(
    model: nn.Module,
    paths: Sequence[str],
    prepare: Prepare,
    texts: Iterable[str],
    n_tokens: int,
    texts_per_forward: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The first ``n_tokens`` kept tokens of ``texts`` (fewer if they run out), per path."""
    it = iter(texts)
    parts: list[dict[str, tuple[Tensor, Tensor]]] = []
    n = 0
    while n < n_tokens and (batch := list(islice(it, texts_per_forward))):
        pairs = forward_hookpoints(model, paths, prepare, batch)
        parts.append(pairs)
        n += len(pairs[paths[0]][0])
    if not parts:
        raise ValueError("no text to collect activations from")
    return {
        p: tuple(torch.cat([part[p][i] for part in parts])[:n_tokens] for i in (0, 1))
        for p in paths
    }


class ShufflingBuffer:
    """A bounded pool of rows that hands out random batches and refills from a source.

    Holds at most ``capacity`` rows in one preallocated [capacity, width] tensor plus the part of
    one source chunk that did not fit (``pending``), so its memory is bounded by
    ``capacity + the largest chunk`` rows whatever the length of the run. :meth:`take` first
    tops the pool up to ``capacity`` (one source chunk at a time), then draws ``n`` distinct rows
    uniformly at random with its own generator and fills the holes with the pool's last rows:
    O(n * width) per batch, never a copy of the whole pool.

    ``state_dict`` / ``load_state_dict`` save and restore the rows, the pending chunk and the
    generator, so a restored buffer hands out exactly the same batches.
    """

    def __init__(
        self,
        capacity: int,
        width: int,
        source: Callable[[], Tensor],
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1 or width < 1:
            raise ValueError(f"capacity and width must be >= 1, got {capacity}, {width}")
        self.rows = torch.empty(capacity, width, device=device, dtype=dtype)
        self.size = 0
        self.pending = self.rows[:0]
        self.source = source
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def fill(self) -> None:
        """Top the pool up to ``capacity`` rows."""
        while self.size < self.capacity:
            if not len(self.pending):
                self.pending = self.source().to(self.rows.dtype)
                continue
            n = min(self.capacity - self.size, len(self.pending))
            self.rows[self.size : self.size + n] = self.pending[:n]
            self.pending = self.pending[n:]
            self.size += n

    def take(self, n: int) -> Tensor:
        """``n`` random rows [n, width] (a new tensor); they leave the pool."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"n must be in [1, capacity={self.capacity}], got {n}")
        self.fill()
        chosen = torch.randperm(self.size, generator=self.generator)[:n].to(self.rows.device)
        out = self.rows[chosen]
        # Move the rows of the last n slots that were not drawn into the holes below them.
        tail = self.size - n
        is_chosen = torch.zeros(self.size, dtype=torch.bool, device=self.rows.device)
        is_chosen[chosen] = True
        holes = chosen[chosen < tail]
        movers = tail + (~is_chosen[tail:]).nonzero()[:, 0]
        self.rows[holes] = self.rows[movers]
        self.size = tail
        return out

    def peek(self, n: int) -> Tensor:
        """The pool's first ``min(n, size)`` rows in arrival order, without removing them."""
        self.fill()
        return self.rows[: min(n, self.size)]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "rows": self.rows[: self.size].cpu().clone(),
            "pending": self.pending.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        rows = state["rows"]
        if rows.shape[0] > self.capacity or rows.shape[1:] != self.rows.shape[1:]:
            raise ValueError(
                f"saved buffer rows {list(rows.shape)} do not fit capacity {self.capacity} x "
                f"width {self.rows.shape[1]}"
            )
        self.size = rows.shape[0]
        self.rows[: self.size] = rows
        self.pending = state["pending"].to(self.rows.device, self.rows.dtype)
        self.generator.set_state(state["generator"])
