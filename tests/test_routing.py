"""route_pairs: the PyTorch implementation against a naive pure-Python reference, the layout's
invariants, and the CUDA implementation (csrc/routing.cu) bit-identical to the PyTorch one: on a
GPU through the torch op, and without one through the host check of its algorithm."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from molt_kernels.ops.routing import Routing, block_capacity, route_pairs
from molt_kernels.ops.routing.cuda import CSRC, load_extension, route_pairs_cuda, unavailable_reason
from molt_kernels.ops.routing.pytorch import route_pairs_torch

TENSOR_FIELDS = [f.name for f in fields(Routing) if f.type == "Tensor"]


# --- inputs ------------------------------------------------------------------------------------


def distinct_rows(n_tokens: int, k: int, n_transforms: int, gen: torch.Generator, skew: float):
    """[n_tokens, k] transform ids, distinct within a row (a token selects a transform once).

    Sorted draws with replacement from [0, T - k], plus 0..k-1, are strictly increasing: a k-subset
    in O(k) per row. ``skew`` > 1 crowds the draws towards low ids (hot transforms); the slots are
    then shuffled so that slot order carries no information.
    """
    u = torch.rand(n_tokens, k, generator=gen) ** skew
    draws = (u * (n_transforms - k + 1)).long().clamp(max=n_transforms - k)
    rows = draws.sort(dim=1).values + torch.arange(k)
    return rows.gather(1, torch.rand(n_tokens, k, generator=gen).argsort(dim=1))


def all_to_one(n_tokens: int, k: int, n_transforms: int, gen: torch.Generator, hot: int):
    """Every token selects transform ``hot`` in a random slot, and k - 1 others."""
    others = distinct_rows(n_tokens, k - 1, n_transforms - 1, gen, skew=1.0)
    rows = torch.cat([others + (others >= hot).long(), torch.full((n_tokens, 1), hot)], dim=1)
    return rows.gather(1, torch.rand(n_tokens, k, generator=gen).argsort(dim=1))


@dataclass(frozen=True)
class Case:
    name: str
    n_tokens: int
    k: int
    bucket_sizes: tuple[int, ...]
    block_m: tuple[int, ...]
    mode: str = "random"  # random | skewed | all_to_one
    keep_prob: float = 1.0
    seed: int = 0

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        t = sum(self.bucket_sizes)
        if self.mode == "all_to_one":
            indices = all_to_one(self.n_tokens, self.k, t, gen, hot=t // 2)
        else:
            skew = 4.0 if self.mode == "skewed" else 1.0
            indices = distinct_rows(self.n_tokens, self.k, t, gen, skew)
        keep = torch.rand(self.n_tokens, self.k, generator=gen) < self.keep_prob
        return indices, keep


SMALL = ((3, 2), (4, 8))  # two buckets of different BLOCK_M
CASES = [
    *(
        Case(f"N{n}-k{k}", n, k, *SMALL, keep_prob=0.8, seed=k)
        for n in (0, 1, 7)
        for k in range(1, 6)
    ),
    Case("random", 64, 6, (40, 25, 9), (16, 8, 4), keep_prob=0.9),
    Case("skewed", 200, 8, (50, 30), (16, 8), "skewed", keep_prob=0.7, seed=1),
    Case("all-to-one", 100, 1, (7, 5), (8, 4), "all_to_one"),
    Case("all-to-one-k4", 90, 4, (7, 5), (8, 4), "all_to_one", keep_prob=0.9, seed=2),
    Case("all-dropped", 20, 3, (6, 4), (4, 2), keep_prob=0.0),
    Case("k-equals-T", 9, 5, SMALL[0], SMALL[1], keep_prob=0.5, seed=3),
    Case("block-m-1-and-odd", 33, 4, (10, 6, 3), (1, 3, 5), keep_prob=0.6, seed=4),
    Case("empty-buckets", 30, 3, (0, 12, 0, 9, 0), (4, 8, 2, 16, 4), keep_prob=0.9, seed=5),
    Case("over-1024-transforms", 64, 32, (1500, 40), (16, 64), "skewed", keep_prob=0.9, seed=6),
]


def case_params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


# --- the naive reference -----------------------------------------------------------------------


def naive_route_pairs(indices, keep, bucket_sizes, block_m) -> dict[str, list[int]]:
    """The layout described in molt_kernels/ops/routing/__init__.py, built one pair at a time."""
    n_tokens, n_slots = indices.shape
    flat, kept = indices.reshape(-1).tolist(), keep.reshape(-1).tolist()
    pairs_of = [[] for _ in range(sum(bucket_sizes))]
    for pair, (t, k) in enumerate(zip(flat, kept)):
        if k:
            pairs_of[t].append(pair)  # ascending flat pair id
    caps = [block_capacity(n_tokens, n_slots, n, m) for n, m in zip(bucket_sizes, block_m)]
    pair_of_row = [-1] * sum(c * m for c, m in zip(caps, block_m))
    row_of_pair = [-1] * len(flat)
    transform_of_block = [-1] * sum(caps)
    blocks_used = []
    first_t, block0, row0 = 0, 0, 0
    for n, m, cap in zip(bucket_sizes, block_m, caps):
        block, row = block0, row0
        for t in range(first_t, first_t + n):
            for rank, pair in enumerate(pairs_of[t]):
                pair_of_row[row + rank] = pair
                row_of_pair[pair] = row + rank
            n_blocks = -(-len(pairs_of[t]) // m)
            transform_of_block[block : block + n_blocks] = [t] * n_blocks
            block, row = block + n_blocks, row + n_blocks * m
        first_t += n
        blocks_used.append(block - block0)
        block0, row0 = block0 + cap, row0 + cap * m
    return {
        "pair_of_row": pair_of_row,
        "row_of_pair": row_of_pair,
        "transform_of_block": transform_of_block,
        "blocks_used": blocks_used,
        "pair_counts": [len(p) for p in pairs_of],
    }


def assert_identical(got: Routing, want: Routing) -> None:
    for name in TENSOR_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == torch.int64, name
        assert torch.equal(a.cpu(), b.cpu()), name
    for name in ("n_slots", "block_m", "block_start", "row_start"):
        assert getattr(got, name) == getattr(want, name), name


# --- the PyTorch implementation ----------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES))
def test_torch_matches_naive(case):
    indices, keep = case.inputs()
    r = route_pairs_torch(indices, keep, case.bucket_sizes, case.block_m)
    want = naive_route_pairs(indices, keep, case.bucket_sizes, case.block_m)
    for name in TENSOR_FIELDS:
        assert getattr(r, name).dtype == torch.int64, name
        assert getattr(r, name).tolist() == want[name], name
    assert r.n_slots == case.k and r.block_m == case.block_m
    caps = [
        block_capacity(case.n_tokens, case.k, n, m) for n, m in zip(case.bucket_sizes, case.block_m)
    ]
    assert [r.block_capacity(b) for b in range(r.n_buckets)] == caps
    assert r.row_start[-1] == r.pair_of_row.numel()
    assert r.block_start[-1] == r.transform_of_block.numel()


@pytest.mark.parametrize("case", case_params(CASES))
def test_layout_invariants(case):
    indices, keep = case.inputs()
    r = route_pairs(indices, keep, case.bucket_sizes, case.block_m)
    flat, kept = indices.reshape(-1), keep.reshape(-1)

    # Every kept pair has exactly one row and that row holds it; dropped pairs have none.
    rows = r.pair_of_row
    placed = rows[rows >= 0]
    assert placed.numel() == placed.unique().numel() == int(kept.sum())
    assert kept[placed].all()
    assert torch.equal(r.row_of_pair[placed], torch.nonzero(rows >= 0).flatten())
    assert (r.row_of_pair[~kept] == -1).all()
    assert torch.equal(r.pair_counts, torch.bincount(flat[kept], minlength=sum(case.bucket_sizes)))

    for b in range(r.n_buckets):
        m, used, cap = r.block_m[b], int(r.blocks_used[b]), r.block_capacity(b)
        assert 0 <= used <= cap  # the capacity bound
        blocks = r.transform_of_block[r.block_start[b] : r.block_start[b + 1]]
        # Used blocks come first, then only unused ones; used blocks are in transform order.
        assert (blocks[:used] >= 0).all() and (blocks[used:] == -1).all()
        assert (blocks[:used].diff() >= 0).all()
        t0 = sum(case.bucket_sizes[:b])
        assert ((blocks[:used] >= t0) & (blocks[:used] < t0 + case.bucket_sizes[b])).all()
        # Every row of a block holds a pair of the block's transform, or is padding (-1).
        region = rows[r.row_start[b] : r.row_start[b + 1]].view(cap, m)
        pairs = region[:used]
        real = pairs >= 0
        assert (flat[pairs[real]] == blocks[:used, None].expand(-1, m)[real]).all()
        assert (region[used:] == -1).all()
        # Padding only at the end of a transform's last block, and pairs ascend within a transform.
        for t in blocks[:used].unique().tolist():
            own = pairs[blocks[:used] == t].flatten()
            n = int(r.pair_counts[t])
            assert (own[:n] >= 0).all() and (own[n:] == -1).all() and (own[:n].diff() > 0).all()
            assert own.numel() == -(-n // m) * m


def test_layout_sizes_depend_on_shapes_only():
    # The same shapes give the same layout sizes, whatever the routing.
    a = Case("a", 50, 4, (30, 20), (8, 16), "skewed").inputs()
    b = Case("b", 50, 4, (30, 20), (8, 16), "all_to_one", keep_prob=0.3).inputs()
    ra, rb = (route_pairs(i, k, (30, 20), (8, 16)) for i, k in (a, b))
    for name in TENSOR_FIELDS:
        assert getattr(ra, name).shape == getattr(rb, name).shape, name
    assert (ra.block_start, ra.row_start) == (rb.block_start, rb.row_start)


# --- the CUDA implementation -------------------------------------------------------------------


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return unavailable_reason()


@pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))
@pytest.mark.parametrize(
    "case",
    case_params(
        [
            *CASES,
            Case("large-skewed", 4096, 32, (20000, 60000, 20000), (64, 16, 8), "skewed", 0.9),
            Case("large-all-to-one", 8192, 8, (1000, 3000), (128, 32), "all_to_one", 0.95),
        ]
    ),
)
def test_cuda_bit_identical_to_torch(case):
    assert load_extension() is not None, "the CUDA routing extension failed to build (see log)"
    indices, keep = (x.cuda() for x in case.inputs())
    want = route_pairs_torch(indices, keep, case.bucket_sizes, case.block_m)
    got = route_pairs_cuda(indices, keep, case.bucket_sizes, case.block_m)
    assert_identical(got, want)
    # Deterministic from run to run, and non-contiguous inputs are handled.
    assert_identical(route_pairs_cuda(indices, keep, case.bucket_sizes, case.block_m), want)
    t_indices, t_keep = indices.t().contiguous().t(), keep.t().contiguous().t()
    assert_identical(route_pairs_cuda(t_indices, t_keep, case.bucket_sizes, case.block_m), want)


# --- the host check of the CUDA algorithm (no GPU needed) --------------------------------------


@pytest.fixture(scope="module")
def host_check(tmp_path_factory) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("routing") / "routing_host_check"
    source = CSRC / "routing_host_check.cpp"
    cmd = [
        compiler,
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        str(source),
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def run_host_check(exe: Path, indices, keep, bucket_sizes, block_m) -> dict[str, list[int]]:
    numbers = [*indices.shape, len(bucket_sizes), *bucket_sizes, *block_m]
    numbers += indices.reshape(-1).tolist() + keep.reshape(-1).int().tolist()
    out = subprocess.run(
        [str(exe)], input=" ".join(map(str, numbers)), check=True, capture_output=True, text=True
    ).stdout
    return {name: [int(v) for v in values] for name, *values in map(str.split, out.splitlines())}


@pytest.mark.parametrize("case", case_params(CASES))
def test_host_check_of_cuda_algorithm_matches_torch(host_check, case):
    indices, keep = case.inputs()
    want = route_pairs_torch(indices, keep, case.bucket_sizes, case.block_m)
    got = run_host_check(host_check, indices, keep, case.bucket_sizes, case.block_m)
    assert sorted(got) == sorted(TENSOR_FIELDS)
    for name in TENSOR_FIELDS:
        assert got[name] == getattr(want, name).tolist(), name
