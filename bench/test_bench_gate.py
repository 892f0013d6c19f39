"""The gate alone: fused gated top-k against F.linear + relu + torch.topk (forward, no_grad).

T in {1k, 16k, 64k}, d_in in {768, 2304}, k in {32, 128}; grouped per shape so that each table
compares the implementations directly. On CUDA: bf16, 8192 tokens, the Triton op, the torch
backend (F.linear, O(T) top-k with the lower-id tie rule) and the unfused baseline. On the CPU:
fp32, 256 tokens, the torch backend against the baseline (the Triton interpreter is not timed).
``extra_info`` carries the analytic bytes each path moves through memory (see ``_bytes_moved``).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from molt_kernels.bench import native_backends
from molt_kernels.ops.gate_topk.torch import gate_topk_torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENS = {"cpu": 256, "cuda": 8192}[DEVICE.type]
INDEX_BYTES = 8  # int64 indices
GATE_BYTES = 4  # the fused op's gates are fp32


def unfused(x, W, b, k):
    return torch.topk(torch.relu(F.linear(x, W, b)), k, dim=1)


def torch_backend(x, W, b, k):
    return gate_topk_torch(x, W, b, k, "relu", None, 0.0)


def triton_op(x, W, b, k):
    from molt_kernels.ops.gate_topk.triton import gate_topk_triton

    return gate_topk_triton(x, W, b, k, "relu", None, 0.0)


IMPLS = {"unfused": unfused, "torch": torch_backend, "triton": triton_op}
TIMED = ("unfused", *(b for b in native_backends(DEVICE) if b in IMPLS))


@functools.lru_cache(maxsize=1)
def _inputs(n_t: int, d_in: int, dtype: torch.dtype):
    # One shape's weights at a time: W is 0.6 GB in fp32 at T=64k, d_in=2304.
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(TOKENS, d_in, generator=gen, device=DEVICE).to(dtype)
    W = (torch.randn(n_t, d_in, generator=gen, device=DEVICE) / d_in**0.5).to(dtype)
    b = torch.zeros(n_t, device=DEVICE, dtype=dtype)
    return x, W, b


def _bytes_moved(impl: str, n: int, n_t: int, d_in: int, k: int, size: int) -> int:
    """Memory traffic with each input read once: x, W, b, then the outputs. The unfused path
    also writes the [n, T] logits, relu reads and writes them, and top-k reads them (a lower
    bound for the torch backend, whose tie-aware selection reads them more than once)."""
    inputs = (n * d_in + n_t * d_in + n_t) * size
    if impl == "triton":
        return inputs + n * k * (GATE_BYTES + INDEX_BYTES)
    logits = n * n_t * size
    return inputs + 4 * logits + n * k * (size + INDEX_BYTES)


@pytest.mark.parametrize("impl", TIMED)
@pytest.mark.parametrize("k", [32, 128])
@pytest.mark.parametrize("d_in", [768, 2304])
@pytest.mark.parametrize("n_t", [1024, 16384, 65536])
def test_gate_topk(benchmark, run, dtype, n_t, d_in, k, impl):
    x, W, b = _inputs(n_t, d_in, dtype)
    fn = IMPLS[impl]
    benchmark.group = f"gate T={n_t} d_in={d_in} k={k} tokens={TOKENS}"
    benchmark.extra_info["bytes_moved"] = _bytes_moved(impl, TOKENS, n_t, d_in, k,
                                                       x.element_size())
    benchmark.extra_info["flops"] = 2 * TOKENS * n_t * d_in

    def step():
        with torch.no_grad():
            fn(x, W, b, k)

    run(step)
