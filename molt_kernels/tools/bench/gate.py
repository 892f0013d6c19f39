"""The gate alone: fused gated top-k against F.linear + relu + torch.topk (forward, no_grad).

Shared by `python -m molt_kernels bench --gate` and `bench/test_bench_gate.py`. On CUDA the Triton
op, the torch backend and the unfused baseline are timed (bf16); on the CPU the torch backend and
the baseline (fp32; the Triton interpreter is not timed). Bytes moved are analytic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.gate_topk.pytorch import gate_topk_torch

GRID_T = (1024, 16384, 65536)
GRID_D = (768, 2304)
GRID_K = (32, 128)
TOKENS = {"cpu": 256, "cuda": 8192}
INDEX_BYTES = 8  # int64 indices
GATE_BYTES = 4  # the fused op's gates are fp32



def unfused(x: Tensor, W: Tensor, b: Tensor, k: int):
    return torch.topk(torch.relu(F.linear(x, W, b)), k, dim=1)


def torch_backend(x: Tensor, W: Tensor, b: Tensor, k: int):
    return gate_topk_torch(x, W, b, k, "relu", None, 0.0)


def triton_op(x: Tensor, W: Tensor, b: Tensor, k: int):
    from ..ops.gate_topk.triton import gate_topk_triton

    return gate_topk_triton(x, W, b, k, "relu", None, 0.0)


IMPLS: dict[str, Callable] = {"unfused": unfused, "torch": torch_backend, "triton": triton_op}


def timed_impls(native: Sequence[str]) -> tuple[str, ...]:
    """The baseline plus every gate backend that runs natively here."""
    return ("unfused", *(b for b in native if b in IMPLS))


def gate_inputs(
    tokens: int, n_t: int, d_in: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """x [tokens, d_in] ~ N(0, 1), W [T, d_in] ~ N(0, 1/d_in), b = 0."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen, device=device).to(dtype)
    W = (torch.randn(n_t, d_in, generator=gen, device=device) / d_in**0.5).to(dtype)
    return x, W, torch.zeros(n_t, device=device, dtype=dtype)


def bytes_moved(impl: str, n: int, n_t: int, d_in: int, k: int, size: int) -> int:
    """Memory traffic with each input read once: x, W, b, then the outputs. The unfused path
    also writes the [n, T] logits, relu reads and writes them, and top-k reads them (a lower
    bound for the torch backend, whose tie-aware selection reads them more than once)."""
    inputs = (n * d_in + n_t * d_in + n_t) * size
    if impl == "triton":
        return inputs + n * k * (GATE_BYTES + INDEX_BYTES)
    logits = n * n_t * size
    return inputs + 4 * logits + n * k * (size + INDEX_BYTES)


def gate_table(
    device: torch.device,
    dtype: torch.dtype,
    impls: Sequence[str],
    time_fn: Callable[[Callable[[], None]], float],
    grid_t: Sequence[int] = GRID_T,
    grid_d: Sequence[int] = GRID_D,
    grid_k: Sequence[int] = GRID_K,
    tokens: int | None = None,
) -> tuple[list[dict], str]:
    """Time every (T, d_in, k, impl); ``time_fn(step)`` returns seconds (median).

    Returns the rows and a markdown table with time, analytic bytes and speed-up over unfused.
    """
    tokens = tokens or TOKENS[device.type]
    rows = []
    for n_t, d_in, k in itertools.product(grid_t, grid_d, grid_k):
        if k > n_t:
            continue
        x, W, b = gate_inputs(tokens, n_t, d_in, dtype, device)
        for impl in impls:
            fn = IMPLS[impl]

            def step(fn=fn, x=x, W=W, b=b, k=k) -> None:
                with torch.no_grad():
                    fn(x, W, b, k)

            seconds = time_fn(step)
            moved = bytes_moved(impl, tokens, n_t, d_in, k, x.element_size())
            rows.append(
                dict(T=n_t, d_in=d_in, k=k, tokens=tokens, impl=impl, seconds=seconds, bytes=moved)
            )
    base = {(r["T"], r["d_in"], r["k"]): r["seconds"] for r in rows if r["impl"] == "unfused"}
    lines = [
        "| T | d_in | k | tokens | impl | ms | MB moved (analytic) | speed-up vs unfused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = base[(r["T"], r["d_in"], r["k"])] / r["seconds"]
        lines.append(
            f"| {r['T']} | {r['d_in']} | {r['k']} | {r['tokens']} | {r['impl']} | "
            f"{r['seconds'] * 1e3:.2f} | {r['bytes'] / 1e6:.1f} | {speedup:.2f} |"
        )
    return rows, "\n".join(lines)
