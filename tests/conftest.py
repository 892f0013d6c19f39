import os

# Kernel tests run Triton on the CPU through its interpreter. Triton binds its kernels and its own
# library to the interpreter when it is first imported, and torch imports triton early (the flop
# counter, gradcheck), so the switch has to be set before any test module is collected. Compiling
# for real GPUs (molt_kernels.tools.gpu_report) happens in fresh worker processes without it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # Fresh but reproducible inputs per test.
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # Long sweeps (@pytest.mark.slow) run only when asked for with -m (e.g. `pytest -m slow`);
    # the default run, CI's `pytest -q`, deselects them (reported as deselected, not skipped).
    if config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
