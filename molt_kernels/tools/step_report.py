"""One forward+backward step of a MOLT layer on the triton backend, counted on the CPU.

``python -m molt_kernels gpu-report --step`` runs the step under the Triton interpreter and
prints each kernel launch (kernel, grid, programs that store or add anything atomically, i.e. do
work), the aten ops
that run outside the kernels (counted with a TorchDispatchMode; torch.library ops and the ops the
interpreter itself runs inside a launch are not counted) and the bytes those ops allocate (every
non-view output: the temporaries of the step, an upper bound on its peak).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch._library import custom_ops
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class LaunchRecord:
    kernel: str
    grid: tuple[int, ...]
    working: int = 0  # programs that stored (or atomically added) at least one element

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass
class StepCounts:
    launches: list[LaunchRecord] = field(default_factory=list)
    aten_ops: Counter = field(default_factory=Counter)
    metadata_ops: Counter = field(default_factory=Counter)  # views and detach: no device work
    allocated_bytes: int = 0
    largest_bytes: int = 0
    # Ops among aten_ops that read a watched tensor (count_step's ``watch``) into a fresh tensor:
    # casts and copies of weights show up here; a no-op ``to`` (returns its input) does not.
    watched_ops: Counter = field(default_factory=Counter)

    @property
    def n_aten_ops(self) -> int:
        """Ops that allocate or compute (views and detach, metadata only, excluded)."""
        return sum(self.aten_ops.values()) - sum(self.metadata_ops.values())

    @property
    def programs(self) -> int:
        return sum(r.programs for r in self.launches)

    @property
    def working(self) -> int:
        return sum(r.working for r in self.launches)


class _AtenCounter(TorchDispatchMode):
    """Counts top-level aten ops and the bytes of their fresh (non-view) outputs, and the ops that
    read the storage of a watched tensor."""

    def __init__(self, counts: StepCounts, watch: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.counts = counts
        self.paused = False
        self.watched = {_storage(t) for t in watch}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = custom_ops.OPDEFS.get(func._schema.name)
        if opdef is not None:
            # A torch.library op of the package: count the ops of its implementation instead.
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = str(func.overloadpacket.__name__)
        self.counts.aten_ops[name] += 1
        if self.watched and not func.is_view:
            read = {_storage(a) for a in pytree.tree_leaves((args, kwargs))}
            fresh = {_storage(t) for t in pytree.tree_leaves(out)} - read
            if read & self.watched and fresh - {None}:
                self.counts.watched_ops[name] += 1
        if func.is_view or name in ("detach", "detach_", "alias"):
            self.counts.metadata_ops[name] += 1
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    nbytes = t.untyped_storage().nbytes()
                    self.counts.allocated_bytes += nbytes
                    self.counts.largest_bytes = max(self.counts.largest_bytes, nbytes)
        return out


def _storage(value: object) -> int | None:
    """The storage address of a tensor, None for anything else."""
    return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None


@contextlib.contextmanager
def count_step(watch: Sequence[torch.Tensor] = ()) -> Iterator[StepCounts]:
    """Counts kernel launches (interpreter only), their working programs and the aten ops, and
    which of those ops read a tensor of ``watch`` (by storage)."""
    from triton.runtime import interpreter

    counts = StepCounts()
    mode = _AtenCounter(counts, watch)
    original_call = interpreter.GridExecutor.__call__
    builder = interpreter.interpreter_builder
    original_store = interpreter.InterpreterBuilder.create_masked_store
    current: dict[str, set] = {}

    def call(self, *args, **kwargs):
        seen: set = set()
        current["seen"] = seen
        mode.paused = True
        try:
            return original_call(self, *args, **kwargs)
        finally:
            mode.paused = False
            current.pop("seen")
            grid = tuple(int(g) for g in builder.grid_dim)
            counts.launches.append(LaunchRecord(self.fn.__name__, grid, len(seen)))

    def note_work(builder, mask) -> None:
        seen = current.get("seen")
        if seen is not None and bool(mask.data.any()):
            seen.add(tuple(builder.grid_idx))

    def masked_store(self, ptr, val, mask, cache_policy):
        note_work(self, mask)
        return original_store(self, ptr, val, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        note_work(self, mask)
        return original_rmw(self, op, ptr, val, mask, sem, scope)

    original_rmw = interpreter.InterpreterBuilder.create_atomic_rmw
    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_masked_store = masked_store
    interpreter.InterpreterBuilder.create_atomic_rmw = atomic_rmw
    try:
        with mode:
            yield counts
    finally:
        interpreter.GridExecutor.__call__ = original_call
        interpreter.InterpreterBuilder.create_masked_store = original_store
        interpreter.InterpreterBuilder.create_atomic_rmw = original_rmw


def run_step(
    d: int, n: int, k: int | None, n_tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> StepCounts:
    """Counts of one forward+backward step of MOLT(d, paper_rank_counts(n), k) on ``n_tokens``
    random tokens, triton backend (under TRITON_INTERPRET=1 on the CPU), after one warm-up step."""
    from ..layers import MOLT, MOLTConfig
    from ..layers.config import paper_rank_counts, scaled_max_rank

    torch.manual_seed(seed)
    cfg = MOLTConfig(d_in=d, rank_counts=paper_rank_counts(n, scaled_max_rank(d)), k=k)
    layer = MOLT(cfg, backend="triton", dtype=dtype)
    x = torch.randn(n_tokens, d, dtype=dtype, requires_grad=True)
    layer(x).float().square().sum().backward()  # warm-up: per-shape tables are cached
    layer.zero_grad()  # gradients set to None, as a training loop leaves them
    x.grad = None
    with count_step() as counts:
        layer(x).float().square().sum().backward()
    return counts


def render_step(counts: StepCounts) -> str:
    lines = [f"{'kernel':<32} {'grid':>16} {'programs':>9} {'working':>8}"]
    for r in counts.launches:
        lines.append(f"{r.kernel:<32} {str(r.grid):>16} {r.programs:>9} {r.working:>8}")
    lines.append(
        f"launches {len(counts.launches)}, programs {counts.programs}, working {counts.working}"
    )
    top = ", ".join(f"{name} {c}" for name, c in counts.aten_ops.most_common())
    lines.append(
        f"aten ops outside kernels {counts.n_aten_ops} computing or allocating + "
        f"{sum(counts.metadata_ops.values())} metadata-only (views, detach): {top}"
    )
    lines.append(
        f"bytes allocated by those ops {counts.allocated_bytes / 2**20:.2f} MiB "
        f"(largest {counts.largest_bytes / 2**20:.2f} MiB)"
    )
    return "\n".join(lines)
