"""Analytic parameter and FLOP counts against FlopCounterMode on the naive reference paths.

FlopCounterMode counts matmuls only (mm, addmm, bmm, ...), 2 FLOPs per multiply-add, as the
analytic counts do; the sparse transcoder's row gather (embedding_bag) is not a matmul and is
invisible to it, which the last tests pin down.
"""

import pytest
import torch
from torch import nn

from molt_kernels import MOLT, MOLTConfig
from molt_kernels.layers.flops import (
    LayerCost,
    matched_transcoder,
    measured_flops,
    mlp_cost,
    molt_cost,
    molt_reference_cost,
    routed_active_rank,
    transcoder_cost,
    transform_ranks,
    uniform_active_rank,
)
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig
from molt_kernels.tools.flops import main

TOKENS = 6


def forward_and_backward_flops(layer, d_in):
    """Measured matmul FLOPs per token of layer(x), and of layer(x) plus its backward."""
    x = torch.randn(TOKENS, d_in, dtype=torch.float64, requires_grad=True)

    def train_step():
        layer(x).sum().backward()

    return measured_flops(layer, x) / TOKENS, measured_flops(train_step) / TOKENS


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "cfg",
    [
        MOLTConfig(d_in=12, rank_counts={5: 2, 3: 3}, k=2),
        MOLTConfig(d_in=10, d_out=7, rank_counts={6: 1, 2: 4, 1: 3}, k=None),
        MOLTConfig.paper(64, 1, 4),
    ],
)
def test_molt_reference_matches_flop_counter(cfg):
    layer = MOLT(cfg, backend="reference", dtype=torch.float64)
    fwd, fwd_bwd = forward_and_backward_flops(layer, cfg.d_in)
    cost = molt_reference_cost(cfg)
    assert cost.params == n_params(layer) == cfg.n_parameters()
    assert fwd == cost.forward
    assert fwd_bwd == cost.forward_backward


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_out", [None, 5])
def test_transcoder_reference_matches_flop_counter(skip, d_out):
    cfg = TranscoderConfig(d_in=9, n_features=14, k=3, d_out=d_out, skip=skip)
    layer = TopKTranscoder(cfg, backend="reference", dtype=torch.float64)
    fwd, fwd_bwd = forward_and_backward_flops(layer, cfg.d_in)
    cost = transcoder_cost(cfg, dense_decode=True)
    assert cost.params == n_params(layer) == cfg.n_parameters()
    assert fwd == cost.forward
    assert fwd_bwd == cost.forward_backward


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_transcoder_decode_is_not_a_matmul(skip):
    cfg = TranscoderConfig(d_in=9, n_features=14, k=3, d_out=5, skip=skip)
    layer = TopKTranscoder(cfg, backend="torch", dtype=torch.float64)
    fwd, fwd_bwd = forward_and_backward_flops(layer, cfg.d_in)
    decode = 2 * cfg.k * cfg.d_out
    cost = transcoder_cost(cfg)
    assert fwd == cost.forward - decode
    assert fwd_bwd == cost.forward_backward - 3 * decode


def test_mlp_matches_flop_counter():
    d_in, width, d_out = 8, 20, 6
    mlp = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out)).double()
    fwd, fwd_bwd = forward_and_backward_flops(mlp, d_in)
    cost = mlp_cost(d_in, width, d_out)
    assert cost.params == n_params(mlp)
    assert (fwd, fwd_bwd) == (cost.forward, cost.forward_backward)
    assert mlp_cost(d_in, width).params == d_in * width + width + width * d_in + d_in


def test_useful_molt_flops_count_only_the_active_transforms():
    cfg = MOLTConfig(d_in=12, d_out=4, rank_counts={5: 2, 3: 3}, k=2)
    assert transform_ranks(cfg).tolist() == [5, 5, 3, 3, 3]
    indices = torch.tensor([[0, 2], [4, 1], [3, 2]])
    gates = torch.tensor([[1.0, 0.5], [2.0, 0.0], [0.3, 0.1]])
    # Active ranks per token: 5+3, 3 (the zero gate drops t=1), 3+3.
    assert routed_active_rank(cfg, indices, gates) == pytest.approx(17 / 3)
    assert routed_active_rank(cfg, indices) == pytest.approx(22 / 3)
    assert routed_active_rank(cfg, indices[:0], gates[:0]) == 0.0
    assert routed_active_rank(cfg, indices.view(3, 1, 2), gates.view(3, 1, 2)) == 17 / 3
    assert uniform_active_rank(cfg) == pytest.approx(2 * 19 / 5)
    cost = molt_cost(cfg, active_rank=17 / 3)
    assert cost.forward == pytest.approx(2 * 12 * 5 + 2 * (17 / 3) * (12 + 4))
    assert cost.backward == 2 * cost.forward
    assert molt_cost(cfg).forward == molt_cost(cfg, uniform_active_rank(cfg)).forward
    # With every transform active the useful FLOPs are the reference's.
    assert molt_cost(cfg, cfg.total_rank) == molt_reference_cost(cfg)
    assert LayerCost(1, 3.0).forward_backward == 9.0


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [
        MOLTConfig.paper(768, 4, 8),
        MOLTConfig.paper(64, 1, None),
        MOLTConfig(d_in=30, d_out=11, rank_counts={7: 3, 2: 5}, k=3, activation="jumprelu"),
    ],
)
def test_matched_transcoder_has_equal_parameters(cfg, skip):
    tc = matched_transcoder(cfg, skip=skip)
    per_feature = cfg.d_in + cfg.d_out + 1
    assert abs(tc.n_parameters() - cfg.n_parameters()) <= per_feature / 2
    assert (tc.d_in, tc.d_out, tc.skip) == (cfg.d_in, cfg.d_out, skip)
    molt_k = cfg.k if cfg.k is not None else round(cfg.expected_l0_at_init)
    assert tc.k == min(molt_k, tc.n_features)
    assert n_params(TopKTranscoder(tc, device="meta")) == tc.n_parameters()
    assert matched_transcoder(cfg, k=1).k == 1


def test_flops_cli_prints_a_table(capsys):
    assert main(["--d", "64", "--n", "1,2", "--k", "4,64"]) == 0
    out = capsys.readouterr().out
    # k=64 exceeds both allocations' transform counts (31 and 62) and is left out.
    assert out.count("\n") == 4 and "| 64 " in out and "MLP(4d) fwd" in out
