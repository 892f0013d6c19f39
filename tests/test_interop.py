"""molt_kernels.interop against checkpoints in the peers' exact layouts (tests/peer_formats.py).

Every converted layer is checked on every backend (triton under the interpreter) against the
peer's own forward, reimplemented independently in float64, to 1e-10; gradients too where the
peer's estimator is one our sparse layer computes (see the notes at each test). Round trips are
tensor-exact; malformed and mismatched files are clear errors.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peer_formats import (
    OPENMOSS_HOOK_IN,
    OPENMOSS_HOOK_OUT,
    crosslayer_checkpoint,
    crosslayer_forward,
    openmoss_checkpoint,
    openmoss_forward,
    sparsify_checkpoint,
    sparsify_forward,
)
from safetensors.torch import load_file, save_file

from molt_kernels.interop import (
    load_crosslayer_transcoder,
    load_openmoss,
    load_sparsify,
    save_openmoss,
    save_sparsify,
)
from molt_kernels.layers.config import MOLTConfig
from molt_kernels.layers.molt import MOLT
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig
from molt_kernels.tools.convert import main as convert_main
from molt_kernels.tools.testing import relative_error

BACKENDS = ["reference", "torch", "triton"]
ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPT = ROOT / "bench" / "openmoss_speedup.py"
TOL = 1e-10


def assert_close(got, want, what):
    err = relative_error(got, want)
    assert err <= TOL, f"{what}: relative error {err:.3g}"


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def run_theirs(forward, tensors, x, cot, **kwargs):
    """(y, d x, {name: d tensor}) of <forward(tensors, x), cot>."""
    leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
    x = x.clone().requires_grad_(True)
    y = forward(leaves, x, **kwargs)
    (y * cot).sum().backward()
    return y.detach(), x.grad, {n: t.grad for n, t in leaves.items()}


def run_ours(layer, x, cot):
    """(y, d x, {parameter name: grad}) of <layer(x), cot>."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * cot).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


# ------------------------------------------------------------------------------------------------
# OpenMOSS

OPENMOSS_LAYOUTS = {"ascending": {1: 4, 2: 3, 5: 2}, "descending": {5: 2, 2: 3, 1: 4}}


def openmoss_file(path, **kwargs):
    kwargs.setdefault("rank_counts", OPENMOSS_LAYOUTS["descending"])
    return openmoss_checkpoint(path, d_model=10, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("scaled", [True, False], ids=["decoder_norm", "plain"])
@pytest.mark.parametrize("act_fn", ["topk", "relu", "jumprelu"])
def test_openmoss_matches_their_forward_and_gradients(tmp_path, backend, order, scaled, act_fn):
    config, tensors = openmoss_file(
        tmp_path,
        rank_counts=OPENMOSS_LAYOUTS[order],
        act_fn=act_fn,
        use_decoder_bias=act_fn != "relu",
        sparsity_include_decoder_norm=scaled,
    )
    layer = load_openmoss(tmp_path, backend=backend)
    # Their buckets go by ascending rank whatever the JSON order.
    assert layer.cfg.ranks == (1, 2, 5) and layer.cfg.scale_gate_by_norm == scaled
    assert layer.cfg.k == (3 if act_fn == "topk" else None)
    x = torch.randn(7, 10, dtype=torch.float64)
    cot = torch.randn(7, 10, dtype=torch.float64)
    # jumprelu: their threshold gradient also counts the window below the threshold, where the gate
    # is 0; a zero gate gets no reconstruction gradient in our sparse decode, so ours is theirs
    # restricted to pre > theta (see the closing note of issue 13).
    y_t, dx_t, g_t = run_theirs(
        lambda t, x: openmoss_forward(config, t, x, threshold_upper_only=True), tensors, x, cot
    )
    y, dx, g = run_ours(layer, x, cot)
    assert_close(y, y_t, "y")
    assert_close(dx, dx_t, "d x")
    assert_close(g["W_gate"], g_t["W_E"].T, "d W_E")
    assert_close(g["b_gate"], g_t["b_E"], "d b_E")
    for b, r in enumerate(layer.cfg.ranks):
        assert_close(g[f"U.{b}"], g_t[f"U_matrices.{r}"], f"d U_matrices.{r}")
        assert_close(g[f"V.{b}"], g_t[f"V_matrices.{r}"], f"d V_matrices.{r}")
    if act_fn != "relu":
        assert_close(g["b_dec"], g_t["b_D"], "d b_D")
    if act_fn == "jumprelu":
        name = "activation_function.log_jumprelu_threshold"
        assert g_t[name].abs().sum() > 0
        assert_close(g["log_threshold"], g_t[name], "d log threshold")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act_fn", ["topk", "jumprelu"])
@pytest.mark.parametrize("scaled", [True, False], ids=["decoder_norm", "plain"])
def test_openmoss_dataset_norms_fold_to_raw_activations(tmp_path, backend, act_fn, scaled):
    config, tensors = openmoss_file(
        tmp_path, act_fn=act_fn, sparsity_include_decoder_norm=scaled, dataset_norms=(7.3, 0.41)
    )
    layer = load_openmoss(tmp_path, backend=backend)
    x = torch.randn(7, 10, dtype=torch.float64) * 2.3  # raw activations, norm ~ 7.3
    cot = torch.randn(7, 10, dtype=torch.float64)
    y_t, dx_t, _ = run_theirs(lambda t, x: openmoss_forward(config, t, x), tensors, x, cot)
    y, dx, _ = run_ours(layer, x, cot)
    assert_close(y, y_t, "y")
    assert_close(dx, dx_t, "d x")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_fn", ["topk", "jumprelu"])
def test_openmoss_file_round_trip_is_tensor_exact(tmp_path, dtype, act_fn):
    config, tensors = openmoss_file(tmp_path / "theirs", act_fn=act_fn, dtype=dtype)
    layer = load_openmoss(tmp_path / "theirs")
    assert layer.W_gate.dtype == dtype
    save_openmoss(
        layer, tmp_path / "again", hook_point_in=OPENMOSS_HOOK_IN, hook_point_out=OPENMOSS_HOOK_OUT
    )
    again = load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    assert_same_tensors(again, {n: t for n, t in tensors.items() if not n.startswith("dataset_")})
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    if act_fn != "topk":  # top_k is unused then; ours writes their default, 50
        assert written.pop("top_k") == 50 and config.pop("top_k") == 3
    assert written == config


def test_our_layer_round_trips_through_openmoss(tmp_path):
    # Buckets in descending rank order (the paper's): the file numbers them ascending, so the
    # loaded layer holds the same transforms under permuted ids and computes the same function.
    cfg = MOLTConfig(
        d_in=8,
        rank_counts={4: 2, 2: 3, 1: 5},
        k=None,
        activation="jumprelu",
        jumprelu_bandwidth=0.7,
        scale_gate_by_norm=True,
    )
    ours = MOLT(cfg, dtype=torch.float64)
    save_openmoss(ours, tmp_path / "a", hook_point_in="in", hook_point_out="out")
    back = load_openmoss(tmp_path / "a")
    assert back.cfg.rank_counts == {1: 5, 2: 3, 4: 2} and back.cfg.jumprelu_bandwidth == 0.7
    order = torch.cat([torch.arange(5, 10), torch.arange(2, 5), torch.arange(0, 2)])
    for name in ("W_gate", "b_gate", "log_threshold"):
        assert torch.equal(getattr(back, name), getattr(ours, name)[order]), name
    for b_back, b_ours in ((0, 2), (1, 1), (2, 0)):
        assert torch.equal(back.U[b_back], ours.U[b_ours])
        assert torch.equal(back.V[b_back], ours.V[b_ours])
    x = torch.randn(6, 8, dtype=torch.float64)
    assert_close(back(x), ours(x), "y")
    # Saving the loaded layer again writes the same file.
    save_openmoss(back, tmp_path / "b", hook_point_in="in", hook_point_out="out")
    assert_same_tensors(
        load_file(str(tmp_path / "b" / "sae_weights.safetensors")),
        load_file(str(tmp_path / "a" / "sae_weights.safetensors")),
    )

    # A layer already in ascending order comes back as it was.
    cfg = MOLTConfig(
        d_in=8, rank_counts={1: 3, 3: 2}, k=2, scale_gate_by_norm=True, decoder_bias=False
    )
    ours = MOLT(cfg, dtype=torch.float32)
    save_openmoss(ours, tmp_path / "c", hook_point_in="in", hook_point_out="out")
    back = load_openmoss(tmp_path / "c")
    assert back.cfg == cfg
    assert_same_tensors(back.state_dict(), ours.state_dict())


def _rewrite_json(file, **changes):
    obj = json.loads(file.read_text())
    file.write_text(json.dumps({**obj, **changes}))


def _openmoss_cfg(**changes):
    return lambda p: _rewrite_json(p / "config.json", **changes)


def _openmoss_tensors(change):
    return lambda p: _rewrite_tensors(p, "sae_weights.safetensors", change)


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda p: (p / "config.json").unlink(), FileNotFoundError, "config.json not found"),
        (_openmoss_cfg(sae_type="sae"), ValueError, "sae_type is 'sae', not 'molt'"),
        (_openmoss_cfg(act_fn="batchtopk"), ValueError, "'batchtopk' is not supported"),
        (_openmoss_cfg(norm_activation="token-wise"), ValueError, "'token-wise' is not supported"),
        (_openmoss_cfg(rank_counts={}), ValueError, "rank_counts is empty"),
        (_openmoss_cfg(rank_counts={"x": 2}), ValueError, "key 'x' is not an int"),
        (_openmoss_cfg(top_k=99), ValueError, r"config.json: k must be in \[1, n_transforms=9\]"),
        (_openmoss_cfg(d_model=11), ValueError, r"'W_E' has shape \[10, 9\], expected \[11, 9\]"),
        (_openmoss_cfg(use_decoder_bias=False), ValueError, r"unexpected tensors \['b_D'\]"),
        (_openmoss_cfg(use_decoder_bias="yes"), ValueError, "use_decoder_bias' must be bool"),
        (
            _openmoss_cfg(norm_activation="dataset-wise"),
            ValueError,
            "dataset_average_activation_norm.blocks.3.ln2.hook_normalized must be finite",
        ),
        (
            _openmoss_tensors(lambda t: t.pop("U_matrices.2")),
            ValueError,
            r"missing tensors \['U_matrices.2'\]",
        ),
        (
            _openmoss_tensors(lambda t: t.update({"V_matrices.2": t["V_matrices.2"][:2].clone()})),
            ValueError,
            r"'V_matrices.2' has shape \[2, 2, 10\], expected \[3, 2, 10\]",
        ),
        (
            lambda p: (p / "sae_weights.safetensors").write_text("{}"),
            ValueError,
            "not a safetensors file",
        ),
    ],
)
def test_openmoss_malformed_files_are_clear_errors(tmp_path, corrupt, error, match):
    openmoss_file(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(error, match=match):
        load_openmoss(tmp_path)


def test_openmoss_dataset_wise_needs_both_norms(tmp_path):
    openmoss_file(tmp_path, dataset_norms=(2.0, 3.0))
    _rewrite_tensors(
        tmp_path,
        "sae_weights.safetensors",
        lambda t: t.pop(f"dataset_average_activation_norm.{OPENMOSS_HOOK_OUT}"),
    )
    with pytest.raises(ValueError, match="hook_point_out.*missing|missing.*hook_point_out"):
        load_openmoss(tmp_path)


def test_save_openmoss_refuses_what_the_format_cannot_hold(tmp_path):
    hooks = dict(hook_point_in="in", hook_point_out="out")
    for cfg, match in [
        (MOLTConfig(d_in=4, d_out=5, rank_counts={2: 2}, k=1), "d_out=5"),
        (MOLTConfig(d_in=4, rank_counts={2: 2}, k=1, standardize=True), "standardisation"),
        (MOLTConfig(d_in=4, rank_counts={2: 2}, k=1, activation="identity"), "identity"),
        (MOLTConfig(d_in=4, rank_counts={2: 2}, k=1, activation="jumprelu"), "jumprelu with a"),
    ]:
        with pytest.raises(ValueError, match=match):
            save_openmoss(MOLT(cfg), tmp_path, **hooks)
    with pytest.raises(ValueError, match="hook_point_in"):
        save_openmoss(
            MOLT(MOLTConfig(d_in=4, rank_counts={2: 2}, k=1)),
            tmp_path,
            hook_point_in="",
            hook_point_out="out",
        )
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# crosslayer-transcoder


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [[4, 2, 1], [1, 3]], ids=["descending", "ascending"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["dimensionwise", "layerwise"])
def test_crosslayer_matches_their_forward(tmp_path, backend, ranks, layerwise):
    ckpt = tmp_path / "clt.ckpt"
    model = crosslayer_checkpoint(
        ckpt, d_acts=9, n=2, ranks=ranks, layerwise=layerwise, bandwidth=0.8
    )
    layer = load_crosslayer_transcoder(ckpt, layer=1, backend=backend)
    cfg = layer.cfg
    assert cfg.ranks == tuple(ranks) and cfg.k is None and cfg.activation == "jumprelu"
    assert cfg.standardize and not cfg.decoder_bias and cfg.jumprelu_bandwidth == 0.8
    x = torch.randn(7, 9, dtype=torch.float64) * 2 + 1
    cot = torch.randn(7, 9, dtype=torch.float64)
    y, dx, g = run_ours(layer, x, cot)
    # Their JumpReLU passes gradient to the pre-activation below the threshold too (pre >= 0),
    # and its threshold window counts both sides; a closed gate gets no reconstruction gradient in
    # our sparse decode, so ours is their forward with the exact pre gradient and the upper side.
    y_t, dx_t, g_t = run_theirs(
        lambda t, x: crosslayer_forward(t, x, 1, exact_pre_grad=True, threshold_upper_only=True),
        model,
        x,
        cot,
    )
    assert_close(y, y_t, "y")
    assert_close(dx, dx_t, "d x")
    assert_close(g["W_gate"], g_t["e.weight"], "d e.weight")
    assert_close(g["b_gate"], g_t["e.bias"], "d e.bias")
    for b in range(len(ranks)):
        assert_close(g[f"U.{b}"], g_t[f"Us.{b}"].transpose(1, 2), f"d Us.{b}")
        assert_close(g[f"V.{b}"], g_t[f"Vs.{b}"].transpose(1, 2), f"d Vs.{b}")
    # Ours is d / d log(theta) = theta * d / d theta.
    theta = model["nonlinearity.theta"].reshape(-1)
    assert g_t["nonlinearity.theta"].abs().sum() > 0
    assert_close(g["log_threshold"], theta * g_t["nonlinearity.theta"].reshape(-1), "d theta")
    # Their own STE, for the record: the forward is the same, the pre gradient is not.
    y_own, dx_own, _ = run_theirs(lambda t, x: crosslayer_forward(t, x, 1), model, x, cot)
    assert_close(y, y_own, "y")
    assert relative_error(dx, dx_own) > 1e-3


def test_crosslayer_thresholds_at_or_below_zero_mean_pre_above_zero(tmp_path):
    ckpt = tmp_path / "clt.ckpt"
    model = crosslayer_checkpoint(ckpt, d_acts=6, n=3, ranks=[2, 1])
    state = torch.load(ckpt, weights_only=True)
    theta = state["state_dict"]["model.nonlinearity.theta"]
    theta[0, :3] = torch.tensor([0.0, -0.2, -5.0], dtype=theta.dtype)
    model["nonlinearity.theta"] = theta
    torch.save(state, ckpt)
    layer = load_crosslayer_transcoder(ckpt, layer=0)
    assert layer.log_threshold[:3].tolist() == [-math.inf] * 3
    x = torch.randn(20, 6, dtype=torch.float64)
    assert_close(layer(x), crosslayer_forward(model, x, 0), "y")


def test_crosslayer_keeps_the_stored_dtype(tmp_path):
    ckpt = tmp_path / "clt.ckpt"
    model = crosslayer_checkpoint(ckpt, d_acts=5, n=1, ranks=[2, 1], dtype=torch.float32)
    layer = load_crosslayer_transcoder(ckpt, layer=2)
    assert all(t.dtype == torch.float32 for t in layer.state_dict().values())
    assert torch.equal(layer.W_gate, model["e.weight"])
    assert torch.equal(layer.U[0], model["Us.0"].transpose(1, 2))
    assert torch.equal(layer.input_std, model["input_standardizer.std"][2])


def _edit_ckpt(change):
    def edit(path):
        ckpt = torch.load(path, weights_only=True)
        change(ckpt["state_dict"])
        torch.save(ckpt, path)

    return edit


class _NotAllowlisted:
    pass


@pytest.mark.parametrize(
    "corrupt, kwargs, error, match",
    [
        (lambda p: p.unlink(), {}, FileNotFoundError, "not found"),
        (lambda p: p.write_text("{}"), {}, ValueError, "is not a readable torch checkpoint"),
        (
            _edit_ckpt(lambda s: s.pop("model.nonlinearity.theta")),
            {},
            ValueError,
            r"missing tensor model.nonlinearity.theta \(a JumpReLU Molt",
        ),
        (
            _edit_ckpt(lambda s: s.pop("model.Vs.1")),
            {},
            ValueError,
            "bucket 1 needs both model.Us.1 and model.Vs.1",
        ),
        (
            _edit_ckpt(lambda s: s.update({"model.Vs.0": s["model.Vs.0"][:, :, :1]})),
            {},
            ValueError,
            r"'model.Vs.0' has shape \[2, 7, 1\], expected \[2, 7, 3\]",
        ),
        (
            _edit_ckpt(lambda s: s.update({"model.nonlinearity.theta": torch.zeros(2, 6)})),
            {},
            ValueError,
            "must be \\[1, 6\\]",
        ),
        (
            _edit_ckpt(lambda s: s.update({"model.decoder.bias": torch.zeros(7)})),
            {},
            ValueError,
            r"unexpected tensors \['decoder.bias'\]",
        ),
        (
            _edit_ckpt(lambda s: s["model.input_standardizer.std"].fill_(0)),
            {},
            ValueError,
            "std has entries <= 0",
        ),
        (lambda p: None, {"layer": 3}, ValueError, r"layer must be in \[0, 3\)"),
        (lambda p: None, {"layer": "1"}, TypeError, "layer must be an int"),
        (
            lambda p: torch.save({"state_dict": {}, "cls": _NotAllowlisted()}, p),
            {},
            ValueError,
            "weights_only=False",
        ),
    ],
)
def test_crosslayer_malformed_files_are_clear_errors(tmp_path, corrupt, kwargs, error, match):
    ckpt = tmp_path / "clt.ckpt"
    crosslayer_checkpoint(ckpt, d_acts=7, n=2, ranks=[3, 1])
    corrupt(ckpt)
    with pytest.raises(error, match=match):
        load_crosslayer_transcoder(ckpt, **{"layer": 0, **kwargs})


def test_crosslayer_duplicate_ranks_are_refused(tmp_path):
    ckpt = tmp_path / "clt.ckpt"
    crosslayer_checkpoint(ckpt, d_acts=4, n=1, ranks=[2, 2])
    with pytest.raises(ValueError, match=r"repeat a rank \(\[2, 2\]\)"):
        load_crosslayer_transcoder(ckpt, layer=0)


# ------------------------------------------------------------------------------------------------
# sparsify


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_matches_their_forward_and_gradients(tmp_path, backend, skip):
    cfg, tensors = sparsify_checkpoint(tmp_path, d_in=12, num_latents=40, k=5, skip_connection=skip)
    layer = load_sparsify(tmp_path, backend=backend)
    assert layer.W_enc.dtype == torch.float64
    x = torch.randn(9, 12, dtype=torch.float64)
    cot = torch.randn(9, 12, dtype=torch.float64)

    theirs = {n: t.clone().requires_grad_(True) for n, t in tensors.items()}
    x_theirs = x.clone().requires_grad_(True)
    y_theirs = sparsify_forward(cfg, theirs, x_theirs)
    (y_theirs * cot).sum().backward()

    x_ours = x.clone().requires_grad_(True)
    y = layer(x_ours)
    (y * cot).sum().backward()
    # Their encoder passes gradient to every kept value, ours only to non-zero ones: the same
    # whenever the k kept values are positive, as here.
    assert bool((layer.encode(x)[0] > 0).all())
    assert_close(y, y_theirs, "y")
    assert_close(x_ours.grad, x_theirs.grad, "d x")
    for name, ours in (
        ("encoder.weight", "W_enc"),
        ("encoder.bias", "b_enc"),
        ("W_dec", "W_dec"),
        ("b_dec", "b_dec"),
        ("W_skip", "W_skip"),
    ):
        if name in theirs:
            assert_close(getattr(layer, ours).grad, theirs[name].grad, f"d {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparsify_round_trips_are_tensor_exact(tmp_path, dtype):
    _, tensors = sparsify_checkpoint(
        tmp_path / "theirs", d_in=8, num_latents=24, k=3, skip_connection=True, dtype=dtype
    )
    layer = load_sparsify(tmp_path / "theirs")
    assert layer.W_enc.dtype == dtype
    save_sparsify(layer, tmp_path / "again")
    assert_same_tensors(load_file(str(tmp_path / "again" / "sae.safetensors")), tensors)

    ours = TopKTranscoder(TranscoderConfig(d_in=8, n_features=20, k=4), dtype=dtype)
    save_sparsify(ours, tmp_path / "ours")
    back = load_sparsify(tmp_path / "ours")
    assert back.cfg == ours.cfg
    assert_same_tensors(back.state_dict(), ours.state_dict())
    # Their loader: num_latents wins over expansion_factor; transcode and k as written.
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert cfg["num_latents"] == 20 and cfg["transcode"] is True and cfg["d_in"] == 8


def test_sparsify_num_latents_zero_uses_the_expansion_factor(tmp_path):
    sparsify_checkpoint(tmp_path, d_in=4, num_latents=8, k=2)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 0, "expansion_factor": 2}))
    assert load_sparsify(tmp_path).cfg.n_features == 8


def _rewrite_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _rewrite_tensors(path, file, change):
    tensors = load_file(str(path / file))
    change(tensors)
    save_file(tensors, str(path / file))


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda p: (p / "cfg.json").unlink(), FileNotFoundError, "cfg.json not found"),
        (lambda p: (p / "cfg.json").write_text("{not json"), ValueError, "not a JSON file"),
        (lambda p: _rewrite_cfg(p, transcode=False), ValueError, "not a transcoder"),
        (lambda p: _rewrite_cfg(p, activation="groupmax"), ValueError, "'groupmax' is not"),
        (lambda p: _rewrite_cfg(p, k=0), ValueError, "k must be a positive int"),
        (lambda p: _rewrite_cfg(p, k=99), ValueError, "k must be in"),
        (lambda p: _rewrite_cfg(p, d_in="8"), ValueError, "d_in must be a positive int"),
        (
            lambda p: (p / "sae.safetensors").write_bytes(b"\x00" * 20),
            ValueError,
            "not a safetensors file",
        ),
        (
            lambda p: _rewrite_tensors(p, "sae.safetensors", lambda t: t.pop("b_dec")),
            ValueError,
            r"missing tensors \['b_dec'\]",
        ),
        (
            lambda p: _rewrite_tensors(
                p, "sae.safetensors", lambda t: t.update(extra=torch.zeros(1))
            ),
            ValueError,
            r"unexpected tensors \['extra'\]",
        ),
        (
            lambda p: _rewrite_tensors(
                p, "sae.safetensors", lambda t: t.update({"W_dec": t["W_dec"][:, :3].clone()})
            ),
            ValueError,
            r"'W_dec' has shape \[16, 3\], expected \[16, 8\]",
        ),
        (
            lambda p: _rewrite_tensors(
                p, "sae.safetensors", lambda t: t.update({"b_dec": t["b_dec"].float()})
            ),
            ValueError,
            "mix dtypes",
        ),
    ],
)
def test_sparsify_malformed_files_are_clear_errors(tmp_path, corrupt, error, match):
    sparsify_checkpoint(tmp_path, d_in=8, num_latents=16, k=3)
    corrupt(tmp_path)
    with pytest.raises(error, match=match):
        load_sparsify(tmp_path)


def test_save_sparsify_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="d_out=5"):
        save_sparsify(
            TopKTranscoder(TranscoderConfig(d_in=4, n_features=8, k=2, d_out=5)), tmp_path
        )
    with pytest.raises(TypeError, match="TopKTranscoder"):
        save_sparsify(torch.nn.Linear(2, 2), tmp_path)


# ------------------------------------------------------------------------------------------------
# python -m molt_kernels convert


def test_convert_from_and_to_each_format(tmp_path, capsys):
    _, tensors = openmoss_file(tmp_path / "om", act_fn="jumprelu")
    assert convert_main(["--from", "openmoss", str(tmp_path / "om"), str(tmp_path / "ours")]) == 0
    assert_same_tensors(
        MOLT.from_pretrained(tmp_path / "ours").state_dict(),
        load_openmoss(tmp_path / "om").state_dict(),
    )
    assert (
        convert_main(
            [
                "--to",
                "openmoss",
                str(tmp_path / "ours"),
                str(tmp_path / "om2"),
                "--hook-point-in",
                OPENMOSS_HOOK_IN,
                "--hook-point-out",
                OPENMOSS_HOOK_OUT,
            ]
        )
        == 0
    )
    assert_same_tensors(
        load_file(str(tmp_path / "om2" / "sae_weights.safetensors")),
        {n: t for n, t in tensors.items() if not n.startswith("dataset_")},
    )

    _, tensors = sparsify_checkpoint(tmp_path / "sp", d_in=6, num_latents=12, k=2)
    assert convert_main(["--from", "sparsify", str(tmp_path / "sp"), str(tmp_path / "tc")]) == 0
    assert convert_main(["--to", "sparsify", str(tmp_path / "tc"), str(tmp_path / "sp2")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "sp2" / "sae.safetensors")), tensors)

    crosslayer_checkpoint(tmp_path / "clt.ckpt", d_acts=5, n=1, ranks=[2, 1])
    assert (
        convert_main(
            [
                "--from",
                "crosslayer-transcoder",
                str(tmp_path / "clt.ckpt"),
                str(tmp_path / "m"),
                "--layer",
                "2",
            ]
        )
        == 0
    )
    assert_same_tensors(
        MOLT.from_pretrained(tmp_path / "m").state_dict(),
        load_crosslayer_transcoder(tmp_path / "clt.ckpt", 2).state_dict(),
    )
    assert "wrote" in capsys.readouterr().out


def test_convert_refuses_the_wrong_file_type_in_one_line_and_writes_nothing(tmp_path):
    sparsify_checkpoint(tmp_path / "sp", d_in=4, num_latents=8, k=2)
    openmoss_file(tmp_path / "om")
    cases = [
        ["--from", "openmoss", str(tmp_path / "sp")],
        ["--from", "sparsify", str(tmp_path / "om")],
        ["--from", "crosslayer-transcoder", str(tmp_path / "om"), "--layer", "0"],
        ["--from", "crosslayer-transcoder", str(tmp_path / "om" / "config.json"), "--layer", "0"],
        ["--to", "sparsify", str(tmp_path / "om")],
        ["--to", "openmoss", str(tmp_path / "sp"), "--hook-point-in", "a", "--hook-point-out", "b"],
    ]
    dst = tmp_path / "dst"
    # One run through `python -m molt_kernels` for the wiring; the other cases run in-process.
    first = cases[0]
    result = subprocess.run(
        [sys.executable, "-m", "molt_kernels", "convert", *first[:3], str(dst), *first[3:]],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: "), result.stderr
    assert not dst.exists()
    for args in cases[1:]:
        assert convert_main([*args[:3], str(dst), *args[3:]]) == 1, args
        assert not dst.exists(), args


def test_convert_argument_and_destination_errors(tmp_path, capsys):
    sparsify_checkpoint(tmp_path / "sp", d_in=4, num_latents=8, k=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert convert_main(["--from", "sparsify", str(tmp_path / "sp"), str(tmp_path / "full")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    for args in (
        ["--from", "crosslayer-transcoder", "a", "b"],
        ["--to", "openmoss", "a", "b"],
        ["--from", "sparsify", "a", "b", "--layer", "1"],
    ):
        with pytest.raises(SystemExit) as exit_:
            convert_main(args)
        assert exit_.value.code == 2


def test_the_bench_baseline_computes_their_forward(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("openmoss_speedup", BENCH_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config, tensors = openmoss_file(tmp_path, act_fn="topk")
    layer_tensors = {n: t for n, t in tensors.items() if not n.startswith("dataset_")}
    baseline = bench.OpenMossDenseMOLT(layer_tensors, top_k=config["top_k"])
    x = torch.randn(7, 10, dtype=torch.float64)
    with torch.no_grad():
        assert_close(baseline(x), openmoss_forward(config, tensors, x), "y")
    # The script end to end on a tiny config (it fails when the two sides disagree).
    assert (
        bench.main(["--d", "32", "--n", "1", "--k", "2", "--tokens", "64", "--repeats", "1"]) == 0
    )
    assert "| forward+backward |" in capsys.readouterr().out
