"""Defect classes of issue 11, each pinned on every backend: exact tie rule, rejected duplicate ids,
refused double backward, NaN containment, torch.func, validation, untrusted checkpoints, the CLI."""

import json
import math

import pytest
import torch

import molt_kernels.layers.functional as MF
from molt_kernels import MOLT, MOLTConfig
from molt_kernels.ops.first_order import DoubleBackwardError
from molt_kernels.tools import verify
from molt_kernels.tools.bench import cli as bench_cli

BACKENDS = ["reference", "torch", "triton"]
NAN, INF = float("nan"), float("inf")


def small_layer(backend: str, activation: str = "relu", k: int | None = 2, **kw) -> MOLT:
    cfg = MOLTConfig(
        d_in=6,
        d_out=5,
        rank_counts={3: 3, 1: 4},
        k=k,
        activation=activation,
        jumprelu_bandwidth=0.5,
        **kw,
    )
    return MOLT(cfg, backend=backend, dtype=torch.float64)


# --- 2: the tie rule is exact for every dtype on every backend

# With d_in = 1, x = 1 and b = 0 the logits are W itself, exactly: near-ties one fp64 ulp apart,
# values beyond fp32's range and below its smallest subnormal, signed zeros, inf and NaN.
TIE_VALUES = [
    1.0,
    1.0 + 2**-52,
    1e300,
    1e300 * (1 + 2**-52),
    1e-300,
    2e-300,
    -0.0,
    0.0,
    INF,
    NAN,
    -INF,
    3.0,
    3.0,
    -1e-310,
    1.0 + 2**-52,
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_tie_rule_is_exact_for_every_dtype_and_backend(dtype, activation):
    W = torch.tensor(TIE_VALUES, dtype=torch.float64)[:, None].to(dtype)
    n_t = W.shape[0]
    x, b = torch.ones(1, 1, dtype=dtype), torch.zeros(n_t, dtype=dtype)
    acts = MF.gate_topk(x, W, b, None, activation, backend="reference")[0][0].double()
    # The rule spelled out: descending value, NaN first, equal values (incl. +-0) by lower id.
    expected = sorted(range(n_t), key=lambda t: (not math.isnan(acts[t]), -acts[t], t))
    for k in (1, 3, 6, n_t):
        for backend in BACKENDS:
            gates, indices = MF.gate_topk(x, W, b, k, activation, backend=backend)
            assert indices[0].tolist() == expected[:k], (backend, k)
            assert torch.equal(
                gates[0].double().nan_to_num(7.0), acts[expected[:k]].nan_to_num(7.0)
            ), (backend, k)


# --- 3: duplicate transform ids are rejected on every backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_ids_in_a_row_are_rejected(backend):
    layer = small_layer(backend)
    x = torch.randn(3, 6, dtype=torch.float64)
    gates, indices = layer.encode(x)
    indices = indices.clone()
    indices[1, 1] = indices[1, 0]
    with pytest.raises(ValueError, match="indices must hold distinct ids within each row"):
        layer.decode(x, gates, indices)
    with pytest.raises(ValueError, match="distinct ids"):
        MF.lowrank_mixture(
            x, gates, indices, list(layer.U), list(layer.V), layer.b_dec, backend=backend
        )
    # The same ids in different rows are fine.
    layer.decode(x, gates, indices[[0, 0, 2]])


def test_duplicate_ids_under_compile_are_a_device_side_assert():
    # The triton backend compiles fullgraph (the torch backend's routing is data-dependent).
    layer = small_layer("triton")
    x = torch.randn(3, 6, dtype=torch.float64)
    gates, indices = layer.encode(x)
    decode = torch.compile(layer.decode, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(decode(x, gates, indices), layer.decode(x, gates, indices))
    indices = indices.clone()
    indices[2, 0] = indices[2, 1]
    with pytest.raises(RuntimeError, match="distinct within each row"):
        decode(x, gates, indices)


# --- 4: double backward is refused with one clear error by the sparse backends


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_a_clear_error(backend):
    layer = small_layer(backend)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(DoubleBackwardError, match=f"on the {backend} backend supports first-order"):
        gx.sum().backward()
    # First-order gradients under create_graph=True are still the right ones.
    ref = small_layer("reference")
    ref.load_state_dict(layer.state_dict())
    (want,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(gx.detach(), want, rtol=1e-10, atol=1e-12)


def test_double_backward_on_the_reference_is_exact():
    layer = small_layer("reference")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g, i = layer.encode(x)
    fn = lambda x: layer.decode(x, g.detach(), i)  # noqa: E731  routing fixed: smooth in x
    torch.autograd.gradgradcheck(fn, (x,))


# --- 10: the CLI fails loudly on requests it cannot honour


@pytest.mark.parametrize("argv", [["--configs", "0"], ["--configs", "-1"], ["--device", "bogus"]])
def test_verify_rejects_requests_that_check_nothing(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2]", "not json", '{"results": 3}'])
def test_bench_render_of_a_non_report_is_a_one_line_error(content, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--render", str(path)])
    assert exit_info.value.code == 2
    assert "--render" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_bogus_device_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--quick", "--device", "bogus"])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


# --- 8: validation gaps are clear errors naming the argument


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_validation_names_the_argument(backend):
    layer = small_layer(backend, activation="jumprelu")
    U, V = list(layer.U), list(layer.V)
    x = torch.randn(3, 6, dtype=torch.float64)
    empty = torch.zeros(3, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match="k >= 1 slots per token, got k=0"):
        MF.lowrank_mixture(x, empty, empty.long(), U, V, layer.b_dec, backend=backend)
    with pytest.raises(ValueError, match="W_gate has 5 rows but U and V hold 7 transforms"):
        MF.molt(x, layer.W_gate[:5], layer.b_gate[:5], U, V, layer.b_dec, 2, backend=backend)
    for bandwidth in (0.0, -1.0, INF, NAN):
        with pytest.raises(ValueError, match="bandwidth must be finite and > 0"):
            MF.gate_topk(
                x,
                layer.W_gate,
                layer.b_gate,
                2,
                "jumprelu",
                layer.log_threshold,
                bandwidth,
                backend=backend,
            )


@pytest.mark.parametrize("field", ["init_scale", "jumprelu_bandwidth", "init_l0"])
@pytest.mark.parametrize("value", [INF, NAN, 0.0, -1.0, True, "1"])
def test_config_numbers_must_be_finite_and_positive(field, value):
    error = TypeError if isinstance(value, (bool, str)) else ValueError
    with pytest.raises(error, match=field):
        MOLTConfig(d_in=4, rank_counts={2: 3}, k=2, **{field: value})


def test_train_config_and_train_reject_bad_arguments():
    from molt_kernels.interp.train import TrainConfig, train

    for lr in (0.0, -1e-3, INF, NAN):
        with pytest.raises(ValueError, match="lr must be finite and > 0"):
            TrainConfig(lr=lr)
    with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
        TrainConfig(weight_decay=-1.0)
    layer = small_layer("torch")
    cfg = TrainConfig(steps=1, batch_size=4, progress=False)
    good_x, good_y = torch.randn(8, 6), torch.randn(8, 5)
    for x, y, name in (
        (torch.randn(8, 5), good_y, "x"),
        (good_x, torch.randn(8, 6), "y"),
        (good_x[None], good_y, "x"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a 2-d tensor"):
            train(layer, x, y, cfg)


def test_metrics_reject_mismatched_shapes():
    from molt_kernels.interp import metrics

    with pytest.raises(ValueError, match="pred and target must have one shape"):
        metrics.fvu(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="pred and target must have one shape"):
        metrics.normalized_mse(torch.randn(4, 5), torch.randn(4, 6))
    layer = small_layer("torch")
    with pytest.raises(ValueError, match=r"x must be a 2-d tensor \[N, 6\]"):
        metrics.molt_jacobian(layer, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be a 2-d tensor"):
        metrics.module_jacobian(layer, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="gates and indices must have one shape"):
        metrics.l0_per_bucket(torch.randn(4, 2), torch.zeros(4, 3, dtype=torch.long), layer.cfg)


# --- 9: untrusted checkpoints are validated before anything is allocated


def _saved(tmp_path):
    layer = small_layer("torch")
    layer.save_pretrained(tmp_path)
    return layer, json.loads((tmp_path / "cfg.json").read_text())


def _write_cfg(tmp_path, meta) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda m: m.update(config=None), ValueError, "'config' must be a JSON object"),
        (lambda m: m.update(format_version=2), ValueError, "format_version 2 is not supported"),
        (lambda m: m.update(format_version=True), ValueError, "format_version True"),
        (lambda m: m.pop("format_version"), ValueError, "format_version None"),
        (lambda m: m["config"].update(d_in="6"), TypeError, "d_in must be an int"),
        (lambda m: m["config"].update(d_in=6.0), TypeError, "d_in must be an int"),
        (lambda m: m["config"].update(rank_counts=[[3.7, 3], [1, 4]]), TypeError, "rank"),
        (lambda m: m["config"].update(rank_counts=[[3, 3, 1]]), ValueError, "pairs"),
        (lambda m: m["config"].update(k=2.0), TypeError, "k must be an int"),
        (lambda m: m["config"].update(init_scale="0.1"), TypeError, "init_scale"),
        (lambda m: m["config"].update(extra=1), ValueError, "unknown MOLTConfig fields"),
        (lambda m: m.update(kind="transcoder"), ValueError, "not a 'molt'"),
    ],
)
def test_malformed_cfg_json_is_a_clear_error(tmp_path, edit, error, match):
    _, meta = _saved(tmp_path)
    edit(meta)
    _write_cfg(tmp_path, meta)
    with pytest.raises(error, match=match):
        MOLT.from_pretrained(tmp_path)


def test_cfg_json_that_is_not_an_object(tmp_path):
    _saved(tmp_path)
    for text in ("null", "[1]", "not json"):
        (tmp_path / "cfg.json").write_text(text)
        with pytest.raises(ValueError, match="JSON"):
            MOLT.from_pretrained(tmp_path)


def test_tensor_header_is_checked_before_allocating(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    layer, meta = _saved(tmp_path)
    # A 1 KB cfg.json naming a huge layer fails on the header, before any parameter exists.
    meta["config"]["d_in"] = 10**7
    _write_cfg(tmp_path, meta)
    built = []
    real_init = MOLT.__init__
    monkeypatch.setattr(
        MOLT,
        "__init__",
        lambda self, cfg, **kw: (built.append(kw.get("device")), real_init(self, cfg, **kw))[1],
    )
    with pytest.raises(ValueError, match="has shape .* the config expects"):
        MOLT.from_pretrained(tmp_path)
    assert built == ["meta"]
    monkeypatch.undo()
    # An integer tensor, mixed dtypes, a missing tensor: refused from the header.
    _, meta = _saved(tmp_path)
    state = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    for edit, match in [
        (lambda s: s.update(b_dec=s["b_dec"].long()), "one floating dtype"),
        (lambda s: s.update(b_dec=s["b_dec"].float()), "one floating dtype"),
        (lambda s: s.pop("b_dec"), r"missing tensors \['b_dec'\]"),
        (lambda s: s.update(W_gate=s["W_gate"][:, :5].contiguous()), "'W_gate' has shape"),
    ]:
        bad = dict(state)
        edit(bad)
        save_file(bad, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            MOLT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MOLT.from_pretrained(tmp_path)


def test_round_trip_still_exact(tmp_path):
    layer, _ = _saved(tmp_path)
    loaded = MOLT.from_pretrained(tmp_path)
    for (name, a), b in zip(layer.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# --- 5 and 11: a non-finite value stays with the live pairs that touch it


def _decode_case():
    gen = torch.Generator().manual_seed(3)
    U = [
        torch.randn(3, 4, 2, generator=gen, dtype=torch.float64),
        torch.randn(4, 4, 1, generator=gen, dtype=torch.float64),
    ]
    V = [
        torch.randn(3, 2, 5, generator=gen, dtype=torch.float64),
        torch.randn(4, 1, 5, generator=gen, dtype=torch.float64),
    ]
    x = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    gates = torch.rand(5, 2, generator=gen, dtype=torch.float64) + 0.1
    indices = torch.tensor([[0, 4], [1, 5], [2, 6], [0, 3], [1, 2]])
    gates[3, 1] = 0.0  # transform 3 is selected only with a zero gate
    U[1][0, 0, 0], V[1][0, 0, 1] = NAN, INF  # ... and holds NaN / Inf
    V[0][2, 0, 0] = NAN  # transform 2: live for tokens 2 and 4 only
    x[1, 0] = NAN  # token 1 (transforms 1 and 5) is bad, with zero loss weight below
    return x, gates, indices, U, V, torch.randn(4, generator=gen, dtype=torch.float64)


def _nan_pattern(t):
    return t.isnan().reshape(t.shape[0], -1).any(1).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_stay_with_their_live_pairs(backend):
    x, gates, indices, U, V, b_dec = _decode_case()
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, *U, *V, b_dec)]
    y = MF.lowrank_mixture(
        leaves[0], leaves[1], indices, leaves[2:4], leaves[4:6], leaves[6], backend=backend
    )
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    (y * weight).sum().backward()
    # Outputs: only the tokens with a live non-finite pair (2 and 4 via transform 2, token 1).
    assert _nan_pattern(y) == [1, 2, 4]
    # Gradients: only rows of those tokens and of the transforms their live pairs touch.
    x_g, g_g, u0, u1, v0, v1, b_g = (t.grad for t in leaves)
    assert [_nan_pattern(t) for t in (x_g, g_g, u0, u1, v0, v1, b_g)] == [
        [2, 4],
        [1, 2, 4],
        [1, 2],
        [2],
        [1],
        [2],
        [],
    ]
    ref = [t.clone().requires_grad_(True) for t in (x, gates, *U, *V, b_dec)]
    y_ref = MF.lowrank_mixture(
        ref[0], ref[1], indices, ref[2:4], ref[4:6], ref[6], backend="reference"
    )
    (y_ref * weight).sum().backward()
    for got, want in zip([y, *(t.grad for t in leaves)], [y_ref, *(t.grad for t in ref)]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


# --- 6: Jacobians on every backend and activation; forward mode refused where unsupported


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
def test_module_jacobian_on_every_backend_and_activation(backend, activation):
    from molt_kernels.interp.metrics import module_jacobian, molt_jacobian

    layer = small_layer(backend, activation)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(
        module_jacobian(layer, x), molt_jacobian(layer, x), rtol=1e-10, atol=1e-12
    )


def _assert_trees_close(got, want) -> None:
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
def test_torch_func_through_the_layer(backend, activation):
    """jacrev, jacfwd, jvp, vmap and grad of vmap through the MOLT module, against the float64
    reference's explicit Jacobian (``molt_jacobian``) and outputs; with the norm-scaled gate."""
    from molt_kernels.interp.metrics import molt_jacobian

    reference = small_layer("reference", activation, scale_gate_by_norm=True)
    layer = small_layer(backend, activation, scale_gate_by_norm=True)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    jac = molt_jacobian(reference, x)  # [3, d_out, d_in]

    def per_token(v):
        return layer(v[None])[0]

    tangent = torch.randn(6, dtype=torch.float64)
    _assert_trees_close(torch.func.jacrev(per_token)(x[0]), jac[0])
    _assert_trees_close(torch.func.jacfwd(per_token)(x[1]), jac[1])
    _assert_trees_close(torch.func.jvp(per_token, (x[2],), (tangent,))[1], jac[2] @ tangent)
    # vmap over a batch dim of the layer's input, and over single tokens
    _assert_trees_close(torch.func.vmap(layer)(x[:, None]), reference(x)[:, None])
    _assert_trees_close(torch.func.vmap(per_token)(x), reference(x))
    # grad of a vmapped loss: one autograd node per folded decode
    weight = torch.randn(3, 5, dtype=torch.float64)
    grad_of_vmap = torch.func.grad(lambda v: (torch.func.vmap(per_token)(v) * weight).sum())
    _assert_trees_close(grad_of_vmap(x), torch.einsum("no,noi->ni", weight, jac))


def _decode_args():
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    U, V = [randn(3, 3, 2), randn(2, 3, 1)], [randn(3, 2, 4), randn(2, 1, 4)]
    gates = randn(3, 2)
    gates[0, 1] = 0.0  # a zero gate: outside the sum, and so is its tangent
    indices = torch.tensor([[0, 4], [1, 3], [2, 0]])
    return (randn(3, 4), gates, U[1], V[1], randn(3)), (indices, U, V)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_through_the_decode(backend):
    """The Jacobian of lowrank_mixture in every argument (x, gates, U, V, b_dec), a jvp in all of
    them, and vmap over token inputs (one folded decode) and over weights (one per sample)."""
    args, (indices, U, V) = _decode_args()

    def decode(x, gates, U1, V1, b_dec, backend=backend):
        return MF.lowrank_mixture(x, gates, indices, [U[0], U1], [V[0], V1], b_dec, backend)

    def reference(*a):
        return decode(*a, backend="reference")

    every = tuple(range(5))
    _assert_trees_close(
        torch.func.jacrev(decode, every)(*args), torch.func.jacrev(reference, every)(*args)
    )
    tangents = tuple(torch.randn_like(a) for a in args)  # every argument's tangent at once
    _assert_trees_close(
        torch.func.jvp(decode, args, tangents), torch.func.jvp(reference, args, tangents)
    )
    x, gates, U1, V1, b_dec = args
    xs, us = torch.stack([x, -2 * x]), torch.stack([U1, 3 * U1])
    for dims, batch in [((0, None, None, None, None), (xs, gates, U1, V1, b_dec)),
                        ((None, None, 0, None, None), (x, gates, us, V1, b_dec))]:  # fmt: skip
        got = torch.func.vmap(decode, in_dims=dims)(*batch)
        _assert_trees_close(got, torch.func.vmap(reference, in_dims=dims)(*batch))
        _assert_trees_close(
            got[1], reference(*[a[1] if d == 0 else a for a, d in zip(batch, dims)])
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
def test_torch_func_through_the_gate(backend, activation):
    """The gates' Jacobians in x, W_gate and b_gate (tangents through the selected values only),
    for k < T and k=None, and vmap over x and over W_gate, against the float64 reference."""
    gen = torch.Generator().manual_seed(4)
    x, W, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 4), (6, 4), (6,)))
    log_threshold = torch.full((6,), -1.0, dtype=torch.float64)
    lt = log_threshold if activation == "jumprelu" else None
    for k in (2, None):

        def gate(x, W, b, backend=backend, k=k):
            return MF.gate_topk(x, W, b, k, activation, lt, 0.5, backend)[0]

        def reference(*a):
            return gate(*a, backend="reference")

        every = (0, 1, 2)
        want = torch.func.jacrev(reference, every)(x, W, b)
        _assert_trees_close(torch.func.jacrev(gate, every)(x, W, b), want)
        _assert_trees_close(torch.func.jacfwd(gate, every)(x, W, b), want)
        for dims, batch in [((0, None, None), (torch.stack([x, 2 * x]), W, b)),
                            ((None, 0, None), (x, torch.stack([W, -W]), b))]:  # fmt: skip
            got = torch.func.vmap(gate, in_dims=dims)(*batch)
            _assert_trees_close(got, torch.func.vmap(reference, in_dims=dims)(*batch))


def test_vmap_of_the_reference_keeps_a_non_finite_token_to_its_sample():
    """The reference computes live pairs with non-finite values pair by pair (a data-dependent
    list); under vmap that runs per sample and gives what each sample gives alone."""
    layer = small_layer("reference")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    x[1, 0, 2] = NAN
    got = torch.func.vmap(layer)(x)
    _assert_trees_close(
        got.nan_to_num(7.0), torch.stack([layer(x[0]), layer(x[1])]).nan_to_num(7.0)
    )
    assert got[1, 0].isnan().all() and got.isfinite().sum() == 25


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_are_a_clear_error(backend):
    """vmap over grad (per-sample gradients) is the one torch.func composition not supported."""
    layer = small_layer(backend)
    x = torch.randn(3, 6, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(lambda v: layer(v[None]).sum()))
    with pytest.raises((NotImplementedError, RuntimeError), match="per-sample|vmap"):
        per_sample(x)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
def test_nan_token_with_zero_loss_weight_is_contained_alike_on_every_backend(activation):
    """A NaN in one token's x, zero loss weight: every backend gives the same outputs and
    gradients, NaN only in that token's output and the gradient rows of the transforms it
    selected with a live gate (for jumprelu its NaN pre is cut, so nothing is NaN)."""
    base = small_layer("reference", activation)
    x = torch.randn(4, 6, dtype=torch.float64)
    x[1, 2] = NAN
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    results = {}
    for backend in BACKENDS:
        layer = small_layer(backend, activation)
        layer.load_state_dict(base.state_dict())
        y = layer(x)
        (y * weight).sum().backward()
        results[backend] = [y, *(p.grad for p in layer.parameters())]
    selected = base.encode(x)[1][1].tolist()
    y, W_gate_grad = results["reference"][0], results["reference"][1]
    assert _nan_pattern(y) == ([] if activation == "jumprelu" else [1])
    assert _nan_pattern(W_gate_grad) == ([] if activation == "jumprelu" else sorted(selected))
    for backend in ("torch", "triton"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
def test_nan_gate_weight_behaves_alike_on_every_backend(activation):
    """A NaN in a W_gate row cannot be contained (that logit is NaN for every token, so every
    token selects it first); all backends must still agree on values and NaN pattern."""
    base = small_layer("reference", activation)
    with torch.no_grad():
        base.W_gate[3, 2] = NAN
    x = torch.randn(4, 6, dtype=torch.float64)
    results = {}
    for backend in BACKENDS:
        layer = small_layer(backend, activation)
        layer.load_state_dict(base.state_dict())
        xb = x.clone().requires_grad_(True)
        y = layer(xb)
        y.sum().backward()
        results[backend] = [y, xb.grad, *(p.grad for p in layer.parameters())]
    for backend in ("torch", "triton"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_gate_gradient_row_check_sees_bad_rows_behind_an_overflowing_sum():
    """The gate backward's clean-input test is one sum: finite rows whose sum overflows must take
    the exact check and come out clean, and a NaN or Inf row must be found either way."""
    from molt_kernels.ops.gate_topk.linear import _bad_rows

    big = torch.full((3, 4), 3e38)  # finite, but the float32 sum is inf
    assert _bad_rows(big).tolist() == []
    assert _bad_rows(torch.randn(3, 4)).tolist() == []
    for bad in (NAN, float("inf"), -float("inf")):
        t = torch.randn(5, 4)
        t[3, 1] = bad
        assert _bad_rows(t).tolist() == [3]
        big[1, 2] = bad
        assert _bad_rows(big).tolist() == [1]
        big[1, 2] = 3e38
