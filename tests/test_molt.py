"""The MOLT layer: torch backend against the float64 naive reference, module behaviour, storage."""

import math
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import molt_kernels.layers.functional as MF
from molt_kernels import MOLT, MOLTConfig
from molt_kernels.layers.backend import ENV_VAR, resolve_backend
from molt_kernels.tools.testing import TOLERANCE, compare_to_reference, relative_error
from molt_kernels.tools.verify import random_config

LAYOUTS = [
    {6: 3},
    {8: 2, 4: 4, 2: 8},
    {48: 2, 7: 3, 1: 5},
]


def assert_matches_reference(layer, x, backend="torch", dtype=torch.float64):
    errors = compare_to_reference(layer, x, backend, dtype)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"{backend}/{dtype} differs from the reference: {bad}"
    return errors


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_reference_on_random_configs(seed, dtype):
    cfg = random_config(random.Random(seed))
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(11, cfg.d_in, dtype=torch.float64)
    assert_matches_reference(layer, x, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
@pytest.mark.parametrize("k_choice", ["one", "half", "all", "none"])
def test_every_k_activation_and_layout(layout, activation, k_choice):
    t = sum(layout.values())
    k = {"one": 1, "half": max(1, t // 2), "all": t, "none": None}[k_choice]
    cfg = MOLTConfig(
        d_in=9, d_out=5, rank_counts=layout, k=k, activation=activation, jumprelu_bandwidth=0.5
    )
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(2, 7, 9, dtype=torch.float64)
    errors = assert_matches_reference(layer, x)
    grads = [name for name in errors if name not in ("y", "x")]
    assert "W_gate" in grads and "U.0" in grads and "V.0" in grads and "b_dec" in grads
    assert ("log_threshold" in grads) == (activation == "jumprelu")


def test_jumprelu_threshold_gradient_is_exercised():
    # With a wide bandwidth many pre-activations sit inside the STE window: the gradient must be
    # non-zero and equal on both backends.
    cfg = MOLTConfig(
        d_in=6, rank_counts={3: 6}, k=3, activation="jumprelu", jumprelu_bandwidth=2.0
    )
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(20, 6, dtype=torch.float64)
    for backend in ("reference", "torch"):
        layer.zero_grad()
        layer.backend = backend
        layer(x).sum().backward()
        assert layer.log_threshold.grad.abs().sum() > 0
    assert_matches_reference(layer, x)


def test_jumprelu_straight_through_estimator_formula():
    cfg = MOLTConfig(d_in=1, rank_counts={1: 2}, k=None, activation="jumprelu",
                     jumprelu_bandwidth=0.2)
    layer = MOLT(cfg, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        layer.W_gate.fill_(1.0)
        layer.b_gate.zero_()
        layer.log_threshold.copy_(torch.tensor([0.5, 2.0]).log())
    x = torch.tensor([[0.55], [0.45], [0.7]], dtype=torch.float64)
    gates, _ = layer.encode(x)
    assert gates[:, 0].tolist() == [0.55, 0.0, 0.7]
    gates.sum().backward()
    # d/d log(theta) = -(theta / eps) * theta per token inside |pre - theta| < eps/2.
    theta, eps = 0.5, 0.2
    assert layer.log_threshold.grad[0].item() == pytest.approx(-2 * theta * theta / eps)
    assert layer.log_threshold.grad[1].item() == 0.0


def test_gradcheck_both_backends():
    cfg = MOLTConfig(d_in=4, d_out=3, rank_counts={3: 2, 2: 3}, k=3)
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.W_gate, layer.b_gate, *layer.U, *layer.V, layer.b_dec]
    params = [p.detach().clone().requires_grad_(True) for p in params]

    def f(backend):
        def run(x, W, b, U0, U1, V0, V1, b_dec):
            return MF.molt(x, W, b, [U0, U1], [V0, V1], b_dec, k=3, backend=backend)

        return run

    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(f(backend), (x, *params), eps=1e-6, atol=1e-7)


def _decode_both(x, gates, indices, U, V, b_dec):
    """Output and gradients of the decode on both backends, as (reference, torch) dicts."""
    results = []
    cot = torch.randn(x.shape[0], U[0].shape[1], dtype=torch.float64)
    for backend in ("reference", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, b_dec, *U, *V)]
        xx, gg, bb = leaves[:3]
        uu, vv = leaves[3 : 3 + len(U)], leaves[3 + len(U) :]
        y = MF.lowrank_mixture(xx, gg, indices, uu, vv, bb, backend=backend)
        (y * cot).sum().backward()
        results.append({"y": y.detach(), **{f"d{i}": t.grad for i, t in enumerate(leaves)}})
    return results


def _routing_indices(kind, n_tokens, k, t):
    """Distinct transform ids per token, [N, k] int64, under a routing distribution."""
    if kind == "uniform":
        weights = torch.ones(t)
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, t + 1, dtype=torch.float64) ** 1.5
    elif kind == "all_to_one":
        # Every token picks the same k transforms: transform 0 gets every token.
        return torch.arange(k).expand(n_tokens, k).clone()
    elif kind == "empty_transforms":
        weights = torch.zeros(t)
        weights[: max(k, t // 3)] = 1.0  # the rest of the transforms get no tokens
    else:
        raise ValueError(kind)
    if n_tokens == 0:
        return torch.zeros(0, k, dtype=torch.int64)
    return torch.multinomial(weights.expand(n_tokens, t), k, replacement=False)


@pytest.mark.parametrize("kind", ["uniform", "zipf", "all_to_one", "empty_transforms"])
@pytest.mark.parametrize("n_tokens", [0, 1, 7, 64])
def test_decode_on_skewed_routings(kind, n_tokens):
    layout = {5: 3, 48: 2, 2: 9}
    t, k, d_in, d_out = sum(layout.values()), 4, 6, 5
    U = [torch.randn(n, d_out, r, dtype=torch.float64) for r, n in layout.items()]
    V = [torch.randn(n, r, d_in, dtype=torch.float64) for r, n in layout.items()]
    x = torch.randn(n_tokens, d_in, dtype=torch.float64)
    indices = _routing_indices(kind, n_tokens, k, t)
    gates = torch.rand(n_tokens, k, dtype=torch.float64)
    gates[gates < 0.2] = 0.0  # dropped pairs
    b_dec = torch.randn(d_out, dtype=torch.float64)
    ref, got = _decode_both(x, gates, indices, U, V, b_dec)
    assert got["y"].shape == (n_tokens, d_out)
    for name in ref:
        assert relative_error(got[name], ref[name]) <= 1e-10, name
    # Zero gates are outside the sum: they get no gradient.
    assert (got["d1"][gates == 0] == 0).all()


def test_more_than_1024_transforms_in_a_bucket():
    U = [torch.randn(1500, 3, 2, dtype=torch.float64)]
    V = [torch.randn(1500, 2, 4, dtype=torch.float64)]
    x = torch.randn(300, 4, dtype=torch.float64)
    indices = torch.stack([torch.randperm(1500)[:5] for _ in range(300)])
    gates = torch.rand(300, 5, dtype=torch.float64)
    ref, got = _decode_both(x, gates, indices, U, V, torch.zeros(3, dtype=torch.float64))
    for name in ref:
        assert relative_error(got[name], ref[name]) <= 1e-10, name


def test_zero_tokens_give_empty_output_and_zero_grads():
    cfg = MOLTConfig(d_in=5, d_out=3, rank_counts={2: 4}, k=2)
    for backend in ("reference", "torch"):
        layer = MOLT(cfg, backend=backend)
        x = torch.zeros(0, 5, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 3)
        y.sum().backward()
        assert layer.W_gate.grad.abs().sum() == 0 and layer.U[0].grad.abs().sum() == 0


def test_leading_dims_and_encode_decode_compose():
    cfg = MOLTConfig(d_in=8, d_out=6, rank_counts={4: 3, 2: 5}, k=3)
    layer = MOLT(cfg, backend="torch", dtype=torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    gates, indices = layer.encode(x)
    assert gates.shape == (2, 3, 5, 3) and indices.shape == (2, 3, 5, 3)
    assert indices.dtype == torch.int64
    y = layer(x)
    assert y.shape == (2, 3, 5, 6)
    torch.testing.assert_close(layer.decode(x, gates, indices), y, rtol=0, atol=0)
    flat = layer(x.reshape(-1, 8)).reshape(2, 3, 5, 6)
    torch.testing.assert_close(flat, y, rtol=1e-12, atol=1e-12)


def test_ties_go_to_the_lower_transform_id():
    cfg = MOLTConfig(d_in=2, rank_counts={1: 6}, k=3, activation="identity")
    for backend in ("reference", "torch"):
        layer = MOLT(cfg, backend=backend, dtype=torch.float64)
        with torch.no_grad():
            layer.W_gate.copy_(torch.tensor([[1, 0], [2, 0], [2, 0], [1, 0], [2, 0], [0, 1.0]]))
            layer.b_gate.zero_()
        _, indices = layer.encode(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        assert indices.tolist() == [[1, 2, 4]], backend


def test_half_inputs_on_cpu_are_computed_in_fp32_and_returned_in_their_dtype():
    cfg = MOLTConfig(d_in=16, rank_counts={8: 2, 4: 4}, k=2)
    layer = MOLT(cfg, backend="torch")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(9, 16).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        gates, _ = layer.encode(x)
        assert gates.dtype == torch.float32
        torch.testing.assert_close(y.float(), layer(x.float()), rtol=2e-2, atol=2e-2)


def test_nan_or_inf_in_one_token_leaves_the_others_unchanged():
    cfg = MOLTConfig(d_in=8, rank_counts={4: 3, 2: 6}, k=3)
    layer = MOLT(cfg, backend="torch", dtype=torch.float64)
    x = torch.randn(7, 8, dtype=torch.float64)
    clean = layer(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = x.clone()
        poisoned[3, 2] = bad
        y = layer(poisoned)
        others = [i for i in range(7) if i != 3]
        assert torch.isfinite(y[others]).all()
        torch.testing.assert_close(y[others], clean[others], rtol=1e-12, atol=1e-12)


def test_torch_backend_work_scales_with_active_pairs():
    # 2 of 96 transforms per token: the sparse path must do a small fraction of the dense FLOPs.
    cfg = MOLTConfig(d_in=64, rank_counts={32: 32, 16: 64}, k=2)
    layer = MOLT(cfg)
    x = torch.randn(512, 64)
    flops = {}
    for backend in ("reference", "torch"):
        layer.backend = backend
        with FlopCounterMode(display=False) as counter:
            layer(x)
        flops[backend] = counter.get_total_flops()
    gate = 2 * 512 * 64 * 96
    assert flops["torch"] - gate < 0.2 * (flops["reference"] - gate)


def test_runs_are_bitwise_deterministic():
    cfg = MOLTConfig(d_in=12, rank_counts={6: 4, 3: 8}, k=4)
    layer = MOLT(cfg, backend="torch")
    x = torch.randn(100, 12)
    runs = []
    for _ in range(2):
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        runs.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_transform_norms_are_exact():
    cfg = MOLTConfig(d_in=7, d_out=5, rank_counts={3: 2, 6: 3}, k=2)
    layer = MOLT(cfg, dtype=torch.float64)
    explicit = torch.cat(
        [torch.linalg.matrix_norm(torch.bmm(u, v)) for u, v in zip(layer.U, layer.V)]
    )
    torch.testing.assert_close(layer.transform_norms(), explicit, rtol=1e-12, atol=0)
    # The cheap bound ||U|| ||V|| is strictly looser for random matrices.
    bound = torch.cat([u.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1)
                       for u, v in zip(layer.U, layer.V)])
    assert (explicit < bound).all()


def test_sparsity_penalty_forms():
    cfg = MOLTConfig(d_in=6, rank_counts={2: 5}, k=2)
    layer = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    gates, indices = layer.encode(x)
    norms = layer.transform_norms()[indices]
    expect_tanh = torch.tanh(3.0 * gates * norms).sum(-1).mean()
    expect_l1 = (gates * norms).sum(-1).mean()
    torch.testing.assert_close(layer.sparsity_penalty(gates, indices, "tanh", c=3.0), expect_tanh)
    torch.testing.assert_close(layer.sparsity_penalty(gates, indices, "l1"), expect_l1)
    layer.sparsity_penalty(gates, indices).backward()
    assert layer.U[0].grad.abs().sum() > 0 and layer.W_gate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="form"):
        layer.sparsity_penalty(gates, indices, "l0")


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_init_opens_about_init_l0_gates(activation):
    cfg = MOLTConfig(d_in=256, rank_counts={8: 64, 4: 192}, k=None, activation=activation,
                     init_l0=16)
    layer = MOLT(cfg)
    gates, _ = layer.encode(torch.randn(2000, 256))
    l0 = (gates != 0).sum(-1).float().mean().item()
    assert 10 < l0 < 24
    # And the output starts small relative to the input.
    x = torch.randn(500, 256)
    ratio = (layer(x) - layer.b_dec).norm() / x.norm()
    assert 0.02 < ratio < 0.5


def test_save_load_round_trip(tmp_path):
    cfg = MOLTConfig(d_in=10, d_out=4, rank_counts={48: 1, 3: 4}, k=2, activation="jumprelu")
    layer = MOLT(cfg)
    x = torch.randn(13, 10)
    layer.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"cfg.json", "model.safetensors"}
    loaded = MOLT.from_pretrained(tmp_path / "m")
    assert loaded.cfg == cfg
    assert torch.equal(loaded(x), layer(x))
    # float64 weights come back bit-exact, not rounded through the default dtype.
    layer64 = MOLT(cfg, dtype=torch.float64)
    layer64.save_pretrained(tmp_path / "m64")
    loaded64 = MOLT.from_pretrained(tmp_path / "m64")
    assert loaded64.W_gate.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(loaded64.parameters(), layer64.parameters()))


def test_load_errors_are_clear(tmp_path):
    cfg = MOLTConfig(d_in=10, rank_counts={3: 4}, k=2)
    MOLT(cfg).save_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        MOLT.from_pretrained(tmp_path / "missing")
    (tmp_path / "a" / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MOLT.from_pretrained(tmp_path / "a")
    # Weights that do not fit the config.
    MOLT(MOLTConfig(d_in=10, rank_counts={3: 5}, k=2)).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text((tmp_path / "a" / "cfg.json").read_text())
    with pytest.raises(ValueError, match="shape"):
        MOLT.from_pretrained(tmp_path / "b")


def test_bad_inputs_are_clear_errors_and_leave_state_alone():
    cfg = MOLTConfig(d_in=6, rank_counts={2: 4}, k=2)
    layer = MOLT(cfg, backend="torch")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_in=6\]"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(3, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[0.0] * 6])
    with pytest.raises(ValueError, match="is on meta but x is on cpu|x is on meta"):
        MF.molt(torch.randn(2, 6), layer.W_gate.to("meta"), layer.b_gate, list(layer.U),
                list(layer.V), layer.b_dec, k=2)
    with pytest.raises(ValueError, match="k must be in"):
        MF.gate_topk(torch.randn(2, 6), layer.W_gate, layer.b_gate, k=5)
    gates, indices = layer.encode(torch.randn(2, 6))
    with pytest.raises(ValueError, match="indices must lie"):
        layer.decode(torch.randn(2, 6), gates, indices + 4)
    with pytest.raises(TypeError, match="indices must be an int64"):
        layer.decode(torch.randn(2, 6), gates, indices.int())
    with pytest.raises(ValueError, match="backend must be one of"):
        MOLT(cfg, backend="cuda")
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("torch", cpu) == "torch"  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="triton"):
        resolve_backend("triton", cpu)  # no GPU and no interpreter


def test_matched_shapes_in_flop_accounting():
    # Parameter count of the module equals the config's formula.
    cfg = MOLTConfig(d_in=12, d_out=7, rank_counts={5: 2, 3: 3}, k=2, activation="jumprelu")
    layer = MOLT(cfg)
    assert sum(p.numel() for p in layer.parameters()) == cfg.n_parameters()
    assert math.isclose(cfg.expected_l0_at_init, 2)
