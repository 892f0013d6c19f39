import pytest
import torch

from molt_kernels import MOLT, MOLTConfig
from molt_kernels.interp.metrics import (
    DeadTracker,
    fvu,
    jacobian_cosine,
    l0,
    l0_per_bucket,
    module_jacobian,
    molt_jacobian,
    normalized_mse,
    transcoder_jacobian,
)
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig


def per_token_autograd_jacobian(layer, x):
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], xi) for xi in x]
    )


def test_fvu_and_nmse_on_hand_computed_cases():
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    # mean [2, 1]; total variance = 1+1+1+1 = 4
    assert fvu(target, target).item() == 0.0
    assert fvu(target.mean(0).expand(2, 2), target).item() == pytest.approx(1.0)
    pred = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    assert fvu(pred, target).item() == pytest.approx(1 / 4)
    assert normalized_mse(pred, target).item() == pytest.approx(1 / 14)


def test_l0_and_per_bucket():
    cfg = MOLTConfig(d_in=2, rank_counts={4: 2, 1: 3}, k=2)
    gates = torch.tensor([[1.0, 0.5], [2.0, 0.0]])
    indices = torch.tensor([[0, 4], [2, 1]])
    assert l0(gates).item() == pytest.approx(1.5)
    assert l0_per_bucket(gates, indices, cfg) == {4: 0.5, 1: 1.0}


def test_dead_tracker_window():
    tracker = DeadTracker(n_units=4, window=3)
    tracker.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[0], [1]]))
    assert tracker.dead_mask().tolist() == [False, False, True, True]
    tracker.update(torch.tensor([[1.0], [0.0]]), torch.tensor([[2], [3]]))
    # 4 tokens seen, window 3: unit 0 last fired at token 2 -> still inside (tokens 2..4).
    assert tracker.dead_mask().tolist() == [False, False, False, True]
    tracker.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[2], [2]]))
    assert tracker.dead_mask().tolist() == [True, True, False, True]
    assert tracker.dead_fraction() == pytest.approx(0.75)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_molt_jacobian_matches_autograd(activation, backend):
    cfg = MOLTConfig(d_in=6, d_out=5, rank_counts={3: 2, 2: 4}, k=3, activation=activation,
                     init_scale=1.0)
    layer = MOLT(cfg, backend=backend, dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)
    closed = molt_jacobian(layer, x)
    torch.testing.assert_close(closed, per_token_autograd_jacobian(layer, x), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(jacobian_cosine(closed, closed), torch.ones(9, dtype=torch.float64))


def test_molt_jacobian_matches_jacrev_on_reference():
    cfg = MOLTConfig(d_in=5, rank_counts={2: 3, 4: 1}, k=2, init_scale=1.0)
    layer = MOLT(cfg, backend="reference", dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(molt_jacobian(layer, x), module_jacobian(layer, x),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_jacobian_matches_autograd(skip):
    cfg = TranscoderConfig(d_in=6, n_features=10, k=3, d_out=4, skip=skip)
    layer = TopKTranscoder(cfg, dtype=torch.float64)
    with torch.no_grad():
        layer.b_enc.fill_(0.3)
        if skip:
            layer.W_skip.normal_()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.testing.assert_close(transcoder_jacobian(layer, x), per_token_autograd_jacobian(layer, x),
                               rtol=1e-10, atol=1e-12)


def test_jacobian_cosine_of_an_mlp_with_itself_and_its_negation():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 4)
    jac = module_jacobian(mlp, x)
    assert jac.shape == (5, 3, 4)
    torch.testing.assert_close(jacobian_cosine(jac, -jac), -torch.ones(5, dtype=torch.float64))
