"""Benchmark workloads: the config grids, inputs, layers and the timed step of each mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import torch
from torch import Tensor, nn

from ...layers.backend import available_backends
from ...layers.config import MOLTConfig
from ...layers.flops import (
    routed_active_rank,
)
from ...layers.molt import MOLT
from ...layers.transcoder import TopKTranscoder, TranscoderConfig

GRID_D = (768, 2304, 4096)
GRID_N = (1, 4, 16)
GRID_K = (8, 32)
GRID_TOKENS = (1024, 8192, 32768)
# Issue #2's acceptance measurement: reference vs torch at d=512, N=2, k=8, 4096 tokens.
QUICK = {"d": (512,), "n": (2,), "k": (8,), "tokens": (4096,)}
# The one workload per device of the pytest-benchmark suites in bench/: the quick case on the CPU,
# a realistic layer on the GPU.
SUITE_CASE = {"cpu": (512, 2, 8, 4096), "cuda": (2304, 4, 8, 16384)}
MODES = ("forward", "forward_backward")
TRANSCODER = "transcoder"
REFERENCE = "reference"
TRITON = "triton"
SEED = 0


# -- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One benchmark config: the paper allocation with N, width d, top-k and a token count."""

    d: int
    n: int
    k: int
    tokens: int

    @property
    def name(self) -> str:
        return f"d={self.d} N={self.n} k={self.k} tok={self.tokens}"

    def molt_config(self) -> MOLTConfig:
        return MOLTConfig.paper(self.d, self.n, self.k)

    def invalid_reason(self) -> str | None:
        t = MOLTConfig.paper(self.d, self.n, None).n_transforms
        return f"k={self.k} > T={t} transforms" if self.k > t else None


def grid(
    d: Sequence[int], n: Sequence[int], k: Sequence[int], tokens: Sequence[int]
) -> list[BenchCase]:
    """Every combination, in (d, N, k, tokens) order."""
    return [BenchCase(*c) for c in product(d, n, k, tokens)]


def native_backends(device: torch.device) -> tuple[str, ...]:
    """MOLT backends that run natively on ``device`` (the Triton interpreter is not timed)."""
    return tuple(
        b for b in available_backends(device) if not (b == TRITON and device.type != "cuda")
    )


def sparse_backend(backends: Sequence[str]) -> str:
    """The fastest sparse backend among ``backends`` (fused kernels before PyTorch)."""
    return TRITON if TRITON in backends else "torch"


# -- workloads ---------------------------------------------------------------------------------


def make_inputs(
    tokens: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """x [tokens, d_in] ~ N(0, 1) (a leaf that requires grad) and grad_y [tokens, d_out]."""
    g = torch.Generator(device="cpu").manual_seed(SEED)
    x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype)
    grad_y = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(), grad_y


def make_molt(cfg: MOLTConfig, device: torch.device, dtype: torch.dtype) -> MOLT:
    """A MOLT with seeded initial weights (its backend is set per run)."""
    torch.manual_seed(SEED)
    return MOLT(cfg, device=device, dtype=dtype)


def make_transcoder(
    cfg: TranscoderConfig, backend: str, device: torch.device, dtype: torch.dtype
) -> TopKTranscoder:
    """A TopK transcoder with seeded initial weights."""
    torch.manual_seed(SEED)
    return TopKTranscoder(cfg, backend=backend, device=device, dtype=dtype)


@torch.no_grad()
def measure_routing(molt: MOLT, x: Tensor) -> tuple[float, float]:
    """(active transforms, sum of their ranks), per token on average, of ``molt``'s gate on x."""
    gates, indices = molt.encode(x)
    active = (gates != 0).sum(-1).float().mean().item() if gates.numel() else 0.0
    return active, routed_active_rank(molt.cfg, indices, gates)


def step_fn(layer: nn.Module, x: Tensor, grad_y: Tensor, mode: str) -> Callable[[], None]:
    """One benchmark step: ``forward`` under no_grad, or ``forward_backward`` into fresh grads."""
    if mode == "forward":

        def step() -> None:
            with torch.no_grad():
                layer(x)

        return step
    if mode != "forward_backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = list(layer.parameters())

    def step() -> None:
        for p in (x, *params):
            p.grad = None
        layer(x).backward(grad_y)

    return step
