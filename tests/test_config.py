import pytest

from molt_kernels import MOLTConfig, paper_rank_counts


def test_paper_allocation_doubles_counts_as_ranks_halve():
    assert paper_rank_counts(2) == {512: 2, 256: 4, 128: 8, 64: 16, 32: 32}
    cfg = MOLTConfig.paper(d_in=2304, n=16, k=32)
    assert cfg.rank_counts == {512: 16, 256: 32, 128: 64, 64: 128, 32: 256}
    assert cfg.n_transforms == 31 * 16
    # 2560N feature-equivalents (sum of ranks) in the paper's accounting.
    assert cfg.total_rank == 2560 * 16


def test_paper_allocation_scales_down_for_small_d():
    cfg = MOLTConfig.paper(d_in=100, n=1, k=4)
    assert cfg.ranks == (64, 32, 16, 8, 4)
    assert cfg.counts == (1, 2, 4, 8, 16)


def test_any_rank_counts_work_in_given_order():
    cfg = MOLTConfig(d_in=8, rank_counts={48: 3, 7: 2, 100: 1}, k=None, d_out=5)
    assert cfg.ranks == (48, 7, 100)
    assert cfg.bucket_offsets == (0, 3, 5, 6)
    assert cfg.d_out == 5


def test_round_trip_through_dict_keeps_bucket_order():
    cfg = MOLTConfig(d_in=8, rank_counts={3: 2, 48: 1}, k=2, activation="jumprelu")
    assert MOLTConfig.from_dict(cfg.to_dict()) == cfg


def test_parameter_count_matches_formula():
    cfg = MOLTConfig(d_in=10, rank_counts={4: 2, 2: 3}, k=2, d_out=6)
    t, sum_r = 5, 4 * 2 + 2 * 3
    assert cfg.n_parameters() == t * (10 + 1) + sum_r * (10 + 6) + 6


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank_counts={}), ValueError, "rank_counts"),
        (dict(rank_counts={0: 2}), ValueError, "rank"),
        (dict(rank_counts={4: 0}), ValueError, "count"),
        (dict(k=0), ValueError, "k must be"),
        (dict(k=7), ValueError, "k must be"),
        (dict(k=2.0), TypeError, "k must be"),
        (dict(d_in=0), ValueError, "d_in"),
        (dict(d_out=-1), ValueError, "d_out"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(jumprelu_bandwidth=0.0), ValueError, "bandwidth"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, exc, match):
    base = dict(d_in=4, rank_counts={2: 3, 1: 3}, k=2)
    with pytest.raises(exc, match=match):
        MOLTConfig(**{**base, **kwargs})
