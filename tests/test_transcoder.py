"""TopK transcoder: sparse decode against its dense float64 reference, module behaviour, storage."""

import pytest
import torch

import molt_kernels.layers.functional as MF
from molt_kernels import MOLT, MOLTConfig
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig, transcoder_decode
from molt_kernels.tools.testing import TOLERANCE, compare_to_reference, relative_error


def randomized(cfg, dtype=torch.float64):
    """A transcoder with every parameter random (biases too), so that some acts are zero."""
    tc = TopKTranscoder(cfg, dtype=dtype)
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    return tc


def assert_matches_reference(tc, x, dtype):
    errors = compare_to_reference(tc, x, "torch", dtype)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"torch/{dtype} differs from the reference: {bad}"
    return errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_out", [None, 5])
@pytest.mark.parametrize("k", ["one", "some", "all"])
def test_matches_dense_reference(dtype, skip, d_out, k):
    n_features = 13
    k = {"one": 1, "some": 4, "all": n_features}[k]
    cfg = TranscoderConfig(d_in=9, n_features=n_features, k=k, d_out=d_out, skip=skip)
    tc = randomized(cfg)
    x = torch.randn(17, 9, dtype=torch.float64)
    errors = assert_matches_reference(tc, x, dtype)
    expected = {"y", "x", "W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if skip else set())
    assert set(errors) == expected


def test_leading_dims_and_empty_batch():
    tc = randomized(TranscoderConfig(d_in=6, n_features=10, k=3, d_out=4, skip=True))
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = tc(x)
    assert y.shape == (2, 3, 4)
    assert relative_error(y.reshape(6, 4), tc(x.reshape(6, 6))) == 0.0
    acts, idx = tc.encode(x)
    assert acts.shape == idx.shape == (2, 3, 3) and idx.dtype == torch.int64
    assert tc(torch.randn(0, 6, dtype=torch.float64)).shape == (0, 4)
    assert tc(torch.randn(2, 0, 6, dtype=torch.float64)).shape == (2, 0, 4)


def test_encode_is_the_relu_gate_op():
    tc = randomized(TranscoderConfig(d_in=8, n_features=20, k=5))
    x = torch.randn(7, 8, dtype=torch.float64)
    acts, idx = tc.encode(x)
    ref_acts, ref_idx = MF.gate_topk(x, tc.W_enc, tc.b_enc, 5, "relu", backend="reference")
    assert torch.equal(idx, ref_idx)
    assert relative_error(acts, ref_acts) < TOLERANCE[torch.float64]
    assert (acts >= 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_sums_repeated_indices(backend):
    W_dec, b_dec = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.randn(1, 2, dtype=torch.float64)
    acts = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    idx = torch.tensor([[1, 1, 3]])
    y = transcoder_decode(x, acts, idx, W_dec, b_dec, backend=backend)
    expected = 3.0 * W_dec[1] + 0.5 * W_dec[3] + b_dec
    assert relative_error(y[0], expected) < TOLERANCE[torch.float64]


def test_half_input_runs_in_fp32_on_cpu():
    tc = randomized(TranscoderConfig(d_in=16, n_features=32, k=4), dtype=torch.float32)
    x = torch.randn(5, 16)
    y = tc.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert relative_error(y, tc.float()(x.bfloat16().float())) < TOLERANCE[torch.bfloat16]


def test_init_unit_decoder_rows_tied_encoder_and_open_gates():
    cfg = TranscoderConfig(d_in=64, n_features=256, k=8, skip=True)
    tc = TopKTranscoder(cfg)
    norms = tc.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms))
    assert torch.equal(tc.W_enc, tc.W_dec)
    assert (tc.b_enc == 0).all() and (tc.b_dec == 0).all() and (tc.W_skip == 0).all()
    acts, _ = tc.encode(torch.randn(100, 64))
    # Pre-activations ~N(0, 1): the top 8 of 256 are all positive.
    assert (acts > 0).all()
    wide = TopKTranscoder(TranscoderConfig(d_in=8, n_features=16, k=2, d_out=24))
    assert torch.allclose(wide.W_enc.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("skip", [False, True])
def test_save_load_round_trip(tmp_path, skip):
    tc = randomized(TranscoderConfig(d_in=7, n_features=11, k=3, d_out=5, skip=skip))
    tc.save_pretrained(tmp_path / "tc")
    loaded = TopKTranscoder.from_pretrained(tmp_path / "tc", dtype=torch.float64)
    assert loaded.cfg == tc.cfg
    x = torch.randn(4, 7, dtype=torch.float64)
    assert torch.equal(loaded(x), tc(x))
    MOLT(MOLTConfig(d_in=7, rank_counts={2: 3}, k=1)).save_pretrained(tmp_path / "molt")
    with pytest.raises(ValueError, match="holds a 'molt', not a 'topk_transcoder'"):
        TopKTranscoder.from_pretrained(tmp_path / "molt")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d_in=0, n_features=4, k=1), ValueError, "d_in"),
        (dict(d_in=4, n_features=4, k=5), ValueError, "k must be in"),
        (dict(d_in=4, n_features=4, k=0), ValueError, "k must be >= 1"),
        (dict(d_in=4, n_features=4.0, k=1), TypeError, "n_features"),
        (dict(d_in=4, n_features=4, k=1, d_out=-1), ValueError, "d_out"),
        (dict(d_in=4, n_features=4, k=1, skip=1), TypeError, "skip"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        TranscoderConfig(**kwargs)


def test_bad_inputs():
    tc = TopKTranscoder(TranscoderConfig(d_in=6, n_features=10, k=3, d_out=4, skip=True))
    x = torch.randn(5, 6)
    acts, idx = tc.encode(x)
    with pytest.raises(TypeError, match="cfg must be a TranscoderConfig"):
        TopKTranscoder({"d_in": 6})
    with pytest.raises(ValueError, match="backend must be one of"):
        TopKTranscoder(tc.cfg, backend="cuda")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_in=6\]"):
        tc(torch.randn(5, 7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        tc(torch.ones(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_in=6\]"):
        tc.decode(torch.randn(5, 7), acts, idx)
    with pytest.raises(ValueError, match="acts must have shape"):
        tc.decode(x, acts[:4], idx[:4])
    with pytest.raises(TypeError, match="indices must be an int64 tensor"):
        tc.decode(x, acts, idx.int())
    with pytest.raises(ValueError, match="indices must match acts"):
        tc.decode(x, acts, idx[:, :2])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_features=10\)"):
        tc.decode(x, acts, torch.full_like(idx, 10))
    with pytest.raises(ValueError, match="W_skip must have shape"):
        transcoder_decode(x, acts, idx, tc.W_dec, tc.b_dec, torch.randn(5, 6), backend="torch")
    with pytest.raises(ValueError, match="b_dec must have shape"):
        transcoder_decode(x, acts, idx, tc.W_dec, torch.randn(3), backend="torch")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        transcoder_decode([1.0], acts, idx, tc.W_dec, tc.b_dec)
