import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Fresh but reproducible inputs per test.
    torch.manual_seed(0)
