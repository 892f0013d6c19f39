"""The cost model's L2 simulation (tools/schedule_sim.py): its cache rule on hand-made streams and
its response to the schedule on a small routed table."""

import numpy as np
import pytest
import torch

from molt_kernels.ops import configs
from molt_kernels.tools import schedule_sim as sim

R, W, RMW = sim.READ, sim.WRITE, sim.RMW


def _traffic(objects, sizes, kinds, capacities):
    n = len(objects)
    hbm, l2 = sim._l2(
        np.arange(n, dtype=float),
        np.array(objects, np.int64),
        np.array(sizes, np.float32),
        np.array(kinds, np.int8),
        capacities,
    )
    return hbm, l2


def test_reuse_hits_when_the_bytes_between_fit() -> None:
    # A (100 B), B (50 B), A again: 50 bytes lie between A's two reads.
    (fits, too_small), l2 = _traffic([1, 2, 1], [100, 50, 100], [R, R, R], (50, 49))
    assert l2 == 250
    assert fits == 150  # A once, B once
    assert too_small == 250  # A fetched twice


def test_written_object_is_written_back_once_per_residency() -> None:
    # Read-modify-write of A twice with B between: one residency if it fits, two if not.
    (fits, too_small), l2 = _traffic([1, 2, 1], [64, 32, 64], [RMW, R, RMW], (32, 0))
    assert l2 == 2 * 64 + 32 + 2 * 64
    assert fits == 64 + 32 + 64  # A read once, B read, A written back once
    assert too_small == 2 * (64 + 64) + 32


def _small_routing(
    windowed: bool, combine: str = "ranges", n_tokens: int = 2048, ranks=(32, 64), counts=(24, 8)
):
    ranks, counts, k, d = list(ranks), list(counts), 4, 256
    cfg = configs.mixture_config(
        n_tokens, k, ranks, counts, d, d, torch.bfloat16, combine=combine
    )
    gen = torch.Generator().manual_seed(0)
    indices = torch.rand(n_tokens, sum(counts), generator=gen).topk(k, dim=1).indices
    rank_of_t = torch.repeat_interleave(torch.tensor(ranks), torch.tensor(counts))
    r = sim.build_routing(indices, torch.ones(n_tokens, k), rank_of_t, cfg, windowed)
    return r, cfg, d


def test_bigger_cache_never_moves_more_hbm_bytes() -> None:
    r, cfg, d = _small_routing(windowed=True)
    caps = (1e4, 1e5, 1e6, 1e12)
    for traffic in (
        sim.shrink_traffic(r, d, cfg.shrink_fwd.tiles, 2, False, 16, caps),
        sim.expand_traffic(r, d, cfg.expand_fwd.tiles, 2, False, 16, caps),
        sim.expand_traffic(r, d, cfg.expand_fwd.tiles, 2, True, 16, caps),
        sim.xty_traffic(r, d, cfg.grad_u.tiles, 2, 16, caps),
    ):
        assert list(traffic.hbm_bytes) == sorted(traffic.hbm_bytes, reverse=True)
        assert traffic.imbalance >= 1
    # With room for everything, the shrink reads x, the weights and writes h_pre once each.
    shrink = sim.shrink_traffic(r, d, cfg.shrink_fwd.tiles, 2, False, 16, (1e12,))
    x, weights = 2048 * d * 2, (24 * 32 + 8 * 64) * d * 2
    h = int((r.rank * cfg.layout.block_m).sum()) * 2
    assert shrink.hbm_bytes[0] == pytest.approx(x + weights + h)


def test_l2_windows_cut_the_shrinks_hbm_bytes(monkeypatch) -> None:
    """Token windows keep a transform's re-reads of a token's row in a cache that cannot hold x
    (4 MiB of rows against 1.5 MiB of cache; 256 KiB of weights, re-read per window)."""
    monkeypatch.setattr(configs, "L2_BUDGET_BYTES", 1 << 20)
    caps = (3 << 19,)
    results = {}
    for windowed in (False, True):
        r, cfg, d = _small_routing(windowed, n_tokens=8192, ranks=(32,), counts=(16,))
        assert cfg.layout.window_ranges < cfg.layout.n_ranges
        results[windowed] = sim.shrink_traffic(r, d, cfg.shrink_fwd.tiles, 2, False, 16, caps)
    assert results[True].hbm_bytes[0] < 0.8 * results[False].hbm_bytes[0]
    assert results[True].l2_bytes == results[False].l2_bytes
