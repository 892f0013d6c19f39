"""The trainer on real MiniLM MLP activations, including the dead-gate collapse and its guard."""

import pytest
import torch

from molt_kernels import MOLT, MOLTConfig
from molt_kernels.interp.train import TrainConfig, train

pytest.importorskip("tokenizers", reason="the MiniLM tokenizer needs the tokenizers package")
minilm = pytest.importorskip("molt_kernels.interp.models.minilm")


@pytest.fixture(scope="module")
def activations():
    """8192 (mlp_in, mlp_out) pairs of MiniLM layer 3 over the offline text source."""
    from molt_kernels.interp.capture import capture_mlp_activations
    from molt_kernels.interp.data import iter_texts

    try:
        model = minilm.load_minilm()
    except ImportError as e:
        pytest.skip(f"MiniLM weights not installed: {e}")
    pairs = capture_mlp_activations(
        model, minilm.minilm_mlp_path(3), iter_texts(), max_tokens=8192, progress=False
    )
    x, y = (torch.cat(t) for t in zip(*pairs))
    assert x.shape == y.shape == (8192, 384)
    return x, y


def fit(x, y, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MOLT(MOLTConfig.paper(384, 1, None, init_l0=8))
    settings = dict(steps=80, batch_size=256, log_every=20, dead_window_tokens=2048, progress=False)
    return layer, train(layer, x, y, TrainConfig(**{**settings, **kwargs}))


def test_trainer_reduces_the_loss_on_real_activations(activations, tmp_path):
    x, y = activations
    layer, log = fit(x, y, checkpoint_every=40, checkpoint_dir=str(tmp_path))
    assert log.fvu[-1] < 0.75 * log.fvu[0]
    assert log.fvu[-1] < 0.7
    assert 2 < log.l0[-1] < 12
    assert log.dead_fraction[-1] == 0.0
    # Checkpoints are loadable layers equal to the trained one at the end.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_40", "step_80"]
    loaded = MOLT.from_pretrained(tmp_path / "step_80")
    assert torch.equal(loaded(x[:64]), layer(x[:64]))


def test_dead_gate_collapse_happens_unguarded_and_not_with_the_guard(activations):
    # Small-norm inputs (as some models' MLP inputs are) close every gate of an init tuned for
    # unit-variance inputs: relu gates then get no gradient and stay dead.
    x, y = activations
    small = 0.05 * x
    _, unguarded = fit(small, y, init_from_data=False, sparsity_warmup_steps=1, revive_every=None)
    assert unguarded.l0[-1] == 0.0 and unguarded.dead_fraction[-1] == 1.0
    assert unguarded.fvu[-1] > 0.95
    _, guarded = fit(small, y)
    assert guarded.l0[-1] > 2 and guarded.dead_fraction[-1] == 0.0
    assert guarded.fvu[-1] < 0.7


def test_reopening_revives_dead_gates(activations):
    x, y = activations
    _, log = fit(0.05 * x, y, init_from_data=False, revive_every=20)
    assert log.dead_fraction[0] == 1.0  # dead before the first reopening at step 20
    assert max(log.dead_fraction[1:]) < 0.25
    assert max(log.l0[1:]) > 0


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="sparsity_form"):
        TrainConfig(sparsity_form="l0")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=10)
    layer = MOLT(MOLTConfig(d_in=4, rank_counts={2: 3}, k=2))
    with pytest.raises(ValueError, match="batch_size"):
        train(layer, torch.randn(10, 4), torch.randn(10, 4), TrainConfig(batch_size=64))


def test_encoder_bias_reopens_dead_transcoder_features():
    from molt_kernels.interp.train import fit_encoder_bias
    from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig

    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(d_in=16, n_features=64, k=4))
    x = torch.randn(8192, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 17, 40]] = True
    with torch.no_grad():
        tc.b_enc[dead] = -100.0  # never in any token's top k
    before = tc.b_enc.detach().clone()
    assert not torch.isin(tc.encode(x)[1], dead.nonzero()).any()
    fit_encoder_bias(tc, x, dead)
    assert torch.equal(tc.b_enc[~dead], before[~dead])
    acts, indices = tc.encode(x)
    for f in dead.nonzero()[:, 0]:
        rate = ((indices == f) & (acts > 0)).any(-1).double().mean().item()
        assert 0.5 * 4 / 64 < rate < 1.5 * 4 / 64, (f, rate)


def test_training_reopens_dead_transcoder_features(activations):
    # A third of the features shut (encoder bias -100): no gradient reaches them, so only the
    # reopening brings them back.
    from molt_kernels.layers.flops import matched_transcoder
    from molt_kernels.layers.transcoder import TopKTranscoder

    x, y = activations
    cfg = matched_transcoder(MOLTConfig.paper(384, 1, None), k=8)
    logs = {}
    for revive in (None, 10):
        torch.manual_seed(0)
        tc = TopKTranscoder(cfg)
        with torch.no_grad():
            tc.b_enc[: cfg.n_features // 3] = -100.0
        settings = dict(steps=40, batch_size=256, log_every=10, progress=False)
        logs[revive] = train(
            tc, x, y, TrainConfig(**settings, revive_every=revive, dead_window_tokens=2048)
        )
    assert min(logs[None].dead_fraction[1:]) > 0.33
    # ~12% is the level with no feature shut: the decoder starts at zero, so after 40 steps some
    # features have not fired in the last 2048 tokens (43% without reopening).
    assert logs[10].dead_fraction[-1] < 0.2


def test_transcoder_decoder_starts_at_zero_and_large_k_keeps_its_features(activations):
    # With a random (tied) decoder, a k=64 transcoder's random output at init is large, and the
    # encoder learned to silence features to cancel it: on MiniLM layer 3 it kept ~25 of its
    # 64 activations positive. A zero decoder starts at the mean output and keeps them all.
    from molt_kernels.interp.metrics import fvu
    from molt_kernels.interp.train import init_from_data
    from molt_kernels.layers.flops import matched_transcoder
    from molt_kernels.layers.transcoder import TopKTranscoder

    x, y = activations
    cfg = matched_transcoder(MOLTConfig.paper(384, 1, None), k=64)
    torch.manual_seed(0)
    tc = TopKTranscoder(cfg)
    init_from_data(tc, x[:2048], y[:2048])
    assert not tc.W_dec.any()
    torch.testing.assert_close(tc(x[:8]), y[:2048].mean(0).expand(8, -1))
    torch.manual_seed(0)
    tc = TopKTranscoder(cfg)
    settings = dict(steps=60, batch_size=256, lr=3e-3, log_every=20, progress=False)
    log = train(tc, x, y, TrainConfig(**settings))
    assert log.l0[-1] > 0.9 * cfg.k, log.l0
    with torch.no_grad():
        assert fvu(tc(x[-1024:]), y[-1024:]) < 0.35
