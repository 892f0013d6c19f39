"""Shared setup of the pytest-benchmark suites (``pytest bench/ --benchmark-only``).

One workload per device (``SUITE_CASE`` of ``molt_kernels.tools.bench.workload``, where the CLI's
grids live too), small enough on a 2-core CPU that the whole suite takes a few minutes; the MOLT
backends are those that run natively here (the Triton interpreter is never timed).
"""

from collections.abc import Callable

import pytest
import torch

from molt_kernels.tools.bench import MODES, BenchCase, native_backends, synchronize
from molt_kernels.tools.bench.workload import SUITE_CASE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 on the CPU, where half matmuls are ~100x slower; bf16 on the GPU, as models train.
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
ROUNDS, WARMUP_ROUNDS = 5, 1


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return DTYPES[DEVICE.type]


@pytest.fixture(scope="session")
def case() -> BenchCase:
    return BenchCase(*SUITE_CASE[DEVICE.type])


@pytest.fixture(params=native_backends(DEVICE))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run(benchmark, device: torch.device) -> Callable[[Callable[[], None]], None]:
    """Benchmark a step: fixed rounds after a warm-up, synchronised on CUDA."""

    def timed(step: Callable[[], None]) -> None:
        def synced() -> None:
            step()
            synchronize(device)

        benchmark.pedantic(synced, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    return timed
