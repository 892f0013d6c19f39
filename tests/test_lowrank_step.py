"""A whole forward+backward step of the triton backend, counted on the CPU (interpreter): launches,
aten ops outside the kernels, host syncs, bytes allocated as T grows, and k=None gating."""

import pytest
import torch

pytest.importorskip("triton")

from molt_kernels import MOLT, MOLTConfig  # noqa: E402
from molt_kernels.layers import functional as MF  # noqa: E402
from molt_kernels.ops import configs  # noqa: E402
from molt_kernels.tools.step_report import count_step, run_step  # noqa: E402

# Ops that read device data back to the host or whose output shape depends on data: any of them
# breaks CUDA-graph capture (the step must run them zero times).
HOST_SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "bincount",
    "is_nonzero",
    "equal",
    "histc",
    "_assert_scalar",
    "tolist",
}


@pytest.fixture(scope="module")
def step_counts():
    # The layer's index check reads back on CPU tensors only; take its CUDA path (a device-side
    # assert), as a captured step would.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        return run_step(d=32, n=1, k=4, n_tokens=64)


def test_step_launches_and_aten_ops(step_counts) -> None:
    assert 0 < len(step_counts.launches) <= 16
    # Ops that compute or allocate; views and autograd's detach launch nothing. The target
    # is 100, including the gate backward's sync-free NaN containment (launch._live_matmul).
    assert step_counts.n_aten_ops <= 100, step_counts.aten_ops
    lowrank = [
        r for r in step_counts.launches if r.kernel.startswith(("_shrink", "_expand", "_xty"))
    ]
    # Whatever the number of rank buckets (5 here): 2 launches forward, 4 backward.
    assert len(lowrank) == 6


def test_step_makes_no_host_sync(step_counts) -> None:
    """No op of the step reads data back or sizes by data, so a CUDA graph can capture it."""
    assert not HOST_SYNC_OPS & set(step_counts.aten_ops), step_counts.aten_ops


def _decode_step_bytes(n_transforms: int, n_tokens: int = 16, k: int = 2, rank: int = 4) -> int:
    """Bytes the decode's fwd+bwd allocates beyond the weight gradients (O(T x d), expected)."""
    d = 16
    torch.manual_seed(0)
    x = torch.randn(n_tokens, d, requires_grad=True)
    gates = torch.rand(n_tokens, k, requires_grad=True)
    # Fixed L0: the tokens use the first 8 transforms only, whatever T is.
    indices = torch.stack([torch.randperm(8)[:k] for _ in range(n_tokens)])
    U = [torch.randn(n_transforms, d, rank, requires_grad=True)]
    V = [torch.randn(n_transforms, rank, d, requires_grad=True)]
    b = torch.zeros(d, requires_grad=True)
    with count_step() as counts:
        MF.lowrank_mixture(x, gates, indices, U, V, b, backend="triton").sum().backward()
    return counts.allocated_bytes - 4 * (U[0].numel() + V[0].numel())


def test_step_memory_flat_in_T_at_fixed_L0() -> None:
    """Past T ~ active pairs every temporary is bounded by the pairs (and tokens), not by T: what
    still grows is O(T) integers of routing (per-transform counts and block starts)."""
    small, large = _decode_step_bytes(64), _decode_step_bytes(256)
    per_transform = (large - small) / (256 - 64)
    assert per_transform <= 16 * 8, (small, large)  # at most 16 int64 per transform
    assert large < 2 * small


def test_layout_bounds_do_not_scale_with_T_for_dense_gating() -> None:
    """k=None hands the decode [N, T] gates; its buffers are sized by N x 128 pairs, not N x T."""
    lay = [
        configs.mixture_layout(4096, t, (512, 32), (t // 2, t // 2), 2304, torch.bfloat16)
        for t in (1024, 16384)
    ]
    assert lay[0].pair_capacity == lay[1].pair_capacity == 4096 * 128
    assert lay[1].h_size <= 1.01 * lay[0].h_size + 127 * 16384 * 272 * lay[1].n_ranges


def test_k_none_at_realistic_l0() -> None:
    """Threshold gating (k=None) with T=136 > 128 slots per token, L0 ~ 16: the pair-capacity
    path, against the reference, forward and every gradient (fp64)."""
    cfg = MOLTConfig(d_in=32, rank_counts={16: 8, 8: 64, 4: 64}, k=None, init_l0=16)
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(24, 32, dtype=torch.float64)
    gates, _ = MF.gate_topk(x, layer.W_gate, layer.b_gate, None, backend="reference")
    assert 4 <= (gates != 0).sum(1).double().mean() <= 40
    outs = {}
    for backend in ("reference", "triton"):
        layer.backend = backend
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        outs[backend] = [y, xx.grad] + [p.grad for p in layer.parameters()]
    for got, ref in zip(outs["triton"], outs["reference"], strict=True):
        assert ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() < 1e-9


def test_pair_capacity_overflow_is_caught() -> None:
    """More active pairs than N x 128 (every one of 200 transforms on) trips the device assert."""
    n, t = 4, 200
    x = torch.randn(n, 8)
    gates = torch.rand(n, t) + 0.5
    indices = torch.arange(t).expand(n, t)
    U, V = [torch.randn(t, 8, 4)], [torch.randn(t, 4, 8)]
    with pytest.raises(RuntimeError, match="pair capacity"):
        MF.lowrank_mixture(x, gates, indices, U, V, torch.zeros(8), backend="triton")


def test_cost_model_cli_writes_modeled_figures(tmp_path, capsys) -> None:
    from molt_kernels.tools import gpu_report

    path = tmp_path / "cost.json"
    argv = ["--cost", "--gpu", "a100", "--d", "512", "--n", "2", "--k", "0", "--l0", "16",
            "--tokens", "2048", "--json", str(path)]
    assert gpu_report.main(argv) == 0
    assert "MODELED" in capsys.readouterr().out
    import json

    cost = json.loads(path.read_text())
    assert cost["config"]["k"] is None and cost["config"]["l0"] == 16
    assert all(k["flops"] > 0 and k["seconds"] > 0 for k in cost["kernels"])
    assert 0 < cost["modeled_fraction_of_dense_rate"] < 1
