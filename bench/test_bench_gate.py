"""The gate alone: fused gated top-k against F.linear + relu + torch.topk (forward, no_grad).

T in {1k, 16k, 64k}, d_in in {768, 2304}, k in {32, 128}, grouped per shape so that each table
compares the implementations directly; the implementations, inputs and analytic byte counts are
those of ``molt_kernels.tools.bench.gate`` (also behind `python -m molt_kernels bench --gate`).
"""

import functools

import pytest
import torch

from molt_kernels.tools.bench import gate as bench_gate
from molt_kernels.tools.bench import native_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENS = bench_gate.TOKENS[DEVICE.type]
TIMED = bench_gate.timed_impls(native_backends(DEVICE))


@functools.lru_cache(maxsize=1)
def _inputs(n_t: int, d_in: int, dtype: torch.dtype):
    # One shape's weights at a time: W is 0.6 GB in fp32 at T=64k, d_in=2304.
    return bench_gate.gate_inputs(TOKENS, n_t, d_in, dtype, DEVICE)


@pytest.mark.parametrize("impl", TIMED)
@pytest.mark.parametrize("k", bench_gate.GRID_K)
@pytest.mark.parametrize("d_in", bench_gate.GRID_D)
@pytest.mark.parametrize("n_t", bench_gate.GRID_T)
def test_gate_topk(benchmark, run, dtype, n_t, d_in, k, impl):
    x, W, b = _inputs(n_t, d_in, dtype)
    fn = bench_gate.IMPLS[impl]
    benchmark.group = f"gate T={n_t} d_in={d_in} k={k} tokens={TOKENS}"
    benchmark.extra_info["bytes_moved"] = bench_gate.bytes_moved(
        impl, TOKENS, n_t, d_in, k, x.element_size()
    )
    benchmark.extra_info["flops"] = 2 * TOKENS * n_t * d_in

    def step():
        with torch.no_grad():
            fn(x, W, b, k)

    run(step)
