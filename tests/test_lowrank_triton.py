"""Triton MOLT decode kernels, run on CPU under TRITON_INTERPRET=1.

Output and every gradient (x, gates, U, V, b_dec) against the float64 reference and the torch
backend, over routings (uniform, Zipf, all tokens to one transform, empty transforms, > 1024
transforms in a bucket), ranks {32, 48, 64, 512}, token counts {0, 1, 7, 300} and dtypes. Every
buffer the kernels fill starts as NaN, so an element they fail to write shows up.
"""


import importlib.util  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from molt_kernels import MOLT, MOLTConfig  # noqa: E402
from molt_kernels.layers import functional as MF  # noqa: E402
from molt_kernels.ops import configs  # noqa: E402
from molt_kernels.ops.lowrank_mixture import builds as lowrank_builds  # noqa: E402
from molt_kernels.ops.lowrank_mixture import launch as triton_impl  # noqa: E402
from molt_kernels.ops.lowrank_mixture import lowrank_mixture_triton  # noqa: E402

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
ZERO_GATES = 0.1  # fraction of pairs with gate 0: dropped by the routing, zero gradient


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    def empty(shape, dtype, device):
        # NaN, or for integer buffers a value no kernel writes by chance.
        fill = float("nan") if dtype.is_floating_point else 0x5A5A5A5A
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(triton_impl, "_empty", empty)


# -- inputs -------------------------------------------------------------------------------------


@dataclass
class Case:
    rank_counts: dict[int, int]
    d_in: int
    d_out: int
    n_tokens: int
    k: int
    routing: str  # uniform | zipf | all_to_one | empty_transforms


def route(case: Case) -> torch.Tensor:
    """indices [N, k]: k distinct transforms per token drawn by the case's routing."""
    n_transforms = sum(case.rank_counts.values())
    # Gumbel top-k draws k distinct transforms per token with probability ~ exp(score).
    score = torch.zeros(case.n_tokens, n_transforms)
    if case.routing == "zipf":
        rank = torch.randperm(n_transforms).float()
        score = score - 1.2 * torch.log1p(rank)
    elif case.routing == "all_to_one":
        score[:, torch.randint(n_transforms, ()).item()] = float("inf")
    elif case.routing == "empty_transforms":
        score[:, 1::2] = -float("inf")
    gumbel = -torch.log(-torch.log(torch.rand(case.n_tokens, n_transforms)))
    return (score + gumbel).topk(case.k, dim=1).indices


def make_inputs(case: Case, dtype: torch.dtype) -> dict:
    """x, gates (fp32, fp64 for fp64 x), indices, U, V, b_dec, all requiring grad but indices."""
    n, d_in, d_out = case.n_tokens, case.d_in, case.d_out
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gates = torch.randn(n, case.k, dtype=gate_dtype)
    gates = gates * (torch.rand(n, case.k) >= ZERO_GATES)
    leaves = dict(
        x=torch.randn(n, d_in).to(dtype),
        gates=gates,
        U=[(torch.randn(c, d_out, r) / r**0.5).to(dtype) for r, c in case.rank_counts.items()],
        V=[(torch.randn(c, r, d_in) / d_in**0.5).to(dtype) for r, c in case.rank_counts.items()],
        b_dec=torch.randn(d_out).to(dtype),
    )
    for value in leaves.values():
        for t in value if isinstance(value, list) else [value]:
            t.requires_grad_()
    return dict(leaves, indices=route(case))


def run(inputs: dict, backend: str, cast=None) -> list[torch.Tensor]:
    """[y, dx, dgates, db_dec, dU..., dV...] for a random projection of y as the loss."""
    cast = cast or (lambda t: t)
    leaves = dict(
        x=cast(inputs["x"]).detach().requires_grad_(),
        gates=cast(inputs["gates"]).detach().requires_grad_(),
        b_dec=cast(inputs["b_dec"]).detach().requires_grad_(),
        U=[cast(u).detach().requires_grad_() for u in inputs["U"]],
        V=[cast(v).detach().requires_grad_() for v in inputs["V"]],
    )
    y = MF.lowrank_mixture(
        leaves["x"], leaves["gates"], inputs["indices"], leaves["U"], leaves["V"],
        leaves["b_dec"], backend=backend,
    )
    projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.double() * projection.double()).sum().backward()
    params = [leaves["x"], leaves["gates"], leaves["b_dec"], *leaves["U"], *leaves["V"]]
    return [y.detach()] + [p.grad for p in params]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (a.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


NAMES = ["y", "dx", "dgates", "db_dec"]

CASES = {
    "uniform": Case({32: 6, 48: 3, 64: 2}, 33, 17, 300, 4, "uniform"),
    "zipf": Case({32: 6, 48: 3, 64: 2}, 33, 17, 300, 4, "zipf"),
    # 300 pairs on one transform: each of its (rank tile, width tile) programs walks all rows.
    "all_to_one": Case({32: 6, 48: 3, 64: 2}, 33, 17, 300, 3, "all_to_one"),
    "empty_transforms": Case({32: 6, 48: 3, 64: 2}, 33, 17, 300, 4, "empty_transforms"),
    "tokens0": Case({32: 4, 48: 3}, 16, 24, 0, 2, "uniform"),
    "tokens1": Case({32: 4, 48: 3}, 16, 24, 1, 3, "uniform"),
    "tokens7": Case({32: 4, 48: 3}, 1, 33, 7, 7, "uniform"),
    "rank512": Case({512: 2, 32: 3}, 8, 5, 7, 2, "zipf"),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check_against_reference_and_torch(case: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, dtype)
    got = run(inputs, "triton")
    ref = run(inputs, "reference", cast=lambda t: t.double())
    sparse = run(inputs, "torch")
    tol = TOLERANCE[dtype]
    names = NAMES + [f"dU[{b}]" for b in range(len(inputs["U"]))]
    names += [f"dV[{b}]" for b in range(len(inputs["V"]))]
    for name, g, r, s in zip(names, got, ref, sparse, strict=True):
        assert g.shape == r.shape and g.dtype == s.dtype, name
        assert torch.isfinite(g).all(), f"{name}: unwritten (NaN) elements"
        assert rel_err(g, r) < tol, f"{name} vs reference: {rel_err(g, r):.2e}"
        # The torch backend computes half inputs in fp32: each is within tol of the reference.
        assert rel_err(g, s) < 2 * tol, f"{name} vs torch backend: {rel_err(g, s):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_and_torch(name: str, dtype: torch.dtype) -> None:
    check_against_reference_and_torch(CASES[name], dtype)


def test_more_than_1024_transforms_in_a_bucket() -> None:
    check_against_reference_and_torch(Case({32: 1100, 48: 2}, 9, 7, 16, 4, "uniform"),
                                      torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bitwise_deterministic(dtype: torch.dtype) -> None:
    inputs = make_inputs(CASES["all_to_one"], dtype)
    first, second = run(inputs, "triton"), run(inputs, "triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["zipf", "all_to_one", "tokens7", "rank512"])
def test_atomic_combine_matches_reference(name: str, dtype: torch.dtype) -> None:
    """The opt-in atomic combine (y and dx; the other outputs do not use it) against fp64."""
    inputs = make_inputs(CASES[name], dtype)
    ref = run(inputs, "reference", cast=lambda t: t.double())
    leaves = {n: inputs[n].detach() for n in ("x", "gates", "b_dec")}
    U, V = [u.detach() for u in inputs["U"]], [v.detach() for v in inputs["V"]]
    y, table, h_pre = triton_impl.forward(leaves["x"], leaves["gates"], inputs["indices"], U, V,
                                          leaves["b_dec"], deterministic=False)
    projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, *_ = triton_impl.backward(projection, leaves["x"], leaves["gates"], table, U, V, h_pre,
                                  (True, False, False, False), deterministic=False)
    for name_, got, want in (("y", y, ref[0]), ("dx", dx, ref[1])):
        assert torch.isfinite(got).all(), f"{name_}: unwritten (NaN) elements"
        assert rel_err(got, want) < TOLERANCE[dtype], f"{name_}: {rel_err(got, want):.2e}"


def _combine_outputs(inputs: dict, deterministic: bool = True) -> tuple[torch.Tensor, ...]:
    """(y, dx) of launch.forward / backward, the two outputs a combine produces."""
    leaves = {n: inputs[n].detach() for n in ("x", "gates", "b_dec")}
    U, V = [u.detach() for u in inputs["U"]], [v.detach() for v in inputs["V"]]
    y, table, h_pre = triton_impl.forward(leaves["x"], leaves["gates"], inputs["indices"], U, V,
                                          leaves["b_dec"], deterministic=deterministic)
    projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    dx, *_ = triton_impl.backward(projection, leaves["x"], leaves["gates"], table, U, V, h_pre,
                                  (True, False, False, False), deterministic=deterministic)
    return y, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fixed_combine_does_not_depend_on_the_order_of_its_adds(monkeypatch, dtype) -> None:
    """The interpreter runs programs in grid order, so permuting the block order permutes the
    order of every row's atomic adds: the fixed-point combine gives bitwise the same y and dx,
    while the fp32 atomic combine (the control: this test can see an order dependence) does
    not."""
    torch.manual_seed(5)
    inputs = make_inputs(Case({32: 6, 48: 3, 64: 2}, 33, 17, 300, 8, "uniform"), dtype)
    assert configs.default_combine(dtype) == "fixed"
    results = {}
    route = triton_impl.route
    for shuffled in (False, True):

        def permuted(*args, shuffled=shuffled):
            table = route(*args)
            if not shuffled:
                return table
            perm = torch.randperm(table.block_order.numel(),
                                  generator=torch.Generator().manual_seed(0))
            return table._replace(block_order=table.block_order[perm])

        monkeypatch.setattr(triton_impl, "route", permuted)
        results[shuffled] = [_combine_outputs(inputs, det) for det in (True, False)]
    (fixed, atomic), (fixed_shuffled, atomic_shuffled) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(fixed, fixed_shuffled, strict=True))
    if dtype == torch.float32:
        assert not all(torch.equal(a, b) for a, b in zip(atomic, atomic_shuffled, strict=True))


def test_fixed_combine_keeps_each_rows_precision() -> None:
    """Token rows 2^-60 to 2^60 apart: each row has its own scale, so each keeps fp32 precision
    against the float64 reference (a shared scale would zero the small rows)."""
    torch.manual_seed(6)
    inputs = make_inputs(CASES["uniform"], torch.float32)
    scale = torch.pow(2.0, torch.linspace(-60, 60, inputs["x"].shape[0]).round())[:, None]
    inputs["x"] = (inputs["x"].detach() * scale).requires_grad_()
    inputs["b_dec"] = torch.zeros_like(inputs["b_dec"])  # a bias would hide the small rows
    y, _ = _combine_outputs(inputs)
    ref = run(inputs, "reference", cast=lambda t: t.double())[0]
    routed = ref.norm(dim=1) > 0  # rows with a live pair
    assert routed.sum() > 250
    per_row = (y.double() - ref).norm(dim=1)[routed] / ref.norm(dim=1)[routed]
    assert (per_row < 1e-5).all(), per_row.max()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN
def test_fixed_combine_contains_non_finite_values_to_their_rows() -> None:
    """A NaN in x and an Inf in one transform's U: the rows whose live pairs meet them are NaN
    (a non-finite bound has no scale), every other row is finite and matches the reference."""
    torch.manual_seed(7)
    inputs = make_inputs(CASES["uniform"], torch.float32)
    x, U0 = inputs["x"].detach().clone(), inputs["U"][0].detach().clone()
    x[5, 0], U0[1, 2, 0] = float("nan"), float("inf")
    inputs["x"], inputs["U"][0] = x, U0
    y, _ = _combine_outputs(inputs)
    live = (inputs["indices"] == 1) & (inputs["gates"] != 0)
    bad = live.any(1)
    bad[5] = True
    assert bad.sum() > 1
    assert y[bad].isnan().all() and y[~bad].isfinite().all()
    ref = run(inputs, "reference", cast=lambda t: t.double())[0]
    assert not ref[bad].isfinite().all(1).any()
    assert rel_err(y[~bad], ref[~bad]) < TOLERANCE[torch.float32]


@pytest.fixture
def split_plans(monkeypatch):
    """dU / dV chunks of 32 rows (16 rows per block here), so the skewed cases split their hot
    transforms; yields the hot-transform ids of every backward's plan."""
    monkeypatch.setattr(configs, "XTY_CHUNK_ROWS", 32)
    plans = []
    plan_split = triton_impl._plan_xty_split

    def spy(table, rank_of_t, *args):
        split = plan_split(table, rank_of_t, *args)
        if split.plan is not None:
            hot = split.plan[2 * (rank_of_t.shape[0] + 1) :]
            plans.append(hot[hot >= 0].tolist())
        return split

    monkeypatch.setattr(triton_impl, "_plan_xty_split", spy)
    return plans


@pytest.mark.parametrize(
    "name, dtype",
    [("all_to_one", torch.float64), ("all_to_one", torch.bfloat16), ("zipf", torch.float32)],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_hot_transforms_split_in_dU_dV(split_plans, name: str, dtype: torch.dtype) -> None:
    """Skewed routing: a hot transform's rows split into chunk programs whose partials a second
    pass sums in order; every output and gradient against the reference."""
    check_against_reference_and_torch(CASES[name], dtype)
    assert split_plans and all(split_plans), "no transform was split"


def test_split_respects_the_partial_budget(split_plans, monkeypatch) -> None:
    """A budget of 200 partial rank rows: the first hot transforms (in id order) split, later
    ones stay whole; still exact."""
    monkeypatch.setattr(configs, "XTY_PARTIAL_ELEMENTS", 200 * 33)  # width max(33, 17)
    torch.manual_seed(3)
    inputs = make_inputs(CASES["zipf"], torch.float64)
    got = run(inputs, "triton")
    ref = run(inputs, "reference", cast=lambda t: t.double())
    assert all(rel_err(g, r) < TOLERANCE[torch.float64] for g, r in zip(got, ref, strict=True))
    assert split_plans and all(1 <= len(hot) <= 200 // 64 for hot in split_plans)
    counts = torch.bincount(inputs["indices"].flatten(), minlength=20)
    assert (counts > 32).sum() > max(len(hot) for hot in split_plans)  # some hot stay whole


def test_split_is_bitwise_deterministic(split_plans) -> None:
    inputs = make_inputs(CASES["all_to_one"], torch.float32)
    first, second = run(inputs, "triton"), run(inputs, "triton")
    assert split_plans
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_torch_compile_traces_the_op() -> None:
    """Fake kernels and register_autograd let torch.compile trace forward and backward whole."""
    inputs = make_inputs(CASES["tokens7"], torch.float32)
    leaves = [inputs["x"], inputs["gates"], inputs["b_dec"], *inputs["U"], *inputs["V"]]

    def decode(x, gates, indices, U, V, b_dec):
        return lowrank_mixture_triton(x, gates, indices, U, V, b_dec)[0]

    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (decode, compiled):
        y = fn(inputs["x"], inputs["gates"], inputs["indices"], inputs["U"], inputs["V"],
               inputs["b_dec"])
        results.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_op_registration() -> None:
    inputs = make_inputs(CASES["tokens7"], torch.float32)
    args = tuple(inputs[n] for n in ("x", "gates", "indices", "U", "V", "b_dec"))
    # Every opcheck test, test_aot_dispatch_dynamic included: the outputs are fully defined.
    torch.library.opcheck(lowrank_mixture_triton, args)


@pytest.mark.skipif(
    importlib.util.find_spec("molt_kernels.ops.gate_topk.autograd") is None,
    reason="the triton gate op (molt_kernels.ops.gate_topk.autograd) has not landed",
)
def test_module_on_triton_backend() -> None:
    cfg = MOLTConfig(d_in=24, d_out=20, rank_counts={48: 2, 32: 4}, k=3)
    model = MOLT(cfg, dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    outs = {}
    for backend in ("reference", "triton"):
        model.backend = backend
        model.zero_grad()
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.square().sum().backward()
        outs[backend] = [y, xx.grad] + [p.grad for p in model.parameters()]
    for a, r in zip(outs["triton"], outs["reference"], strict=True):
        assert rel_err(a, r) < TOLERANCE[torch.float64]


def test_atomic_combine_is_an_opt_in_of_the_module_and_the_op() -> None:
    """``MOLT(deterministic=False)`` reaches the op's atomic combine: its output and gradients
    match the deterministic default's; the op's fake shapes hold for both layouts (fp64: the
    "ranges" combine by default, "atomic" opted in); a non-bool is refused."""
    cfg = MOLTConfig(d_in=24, d_out=20, rank_counts={48: 2, 32: 4}, k=3)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    outs = {}
    for deterministic in (True, False):
        torch.manual_seed(0)
        model = MOLT(cfg, backend="triton", dtype=torch.float64, deterministic=deterministic)
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.square().sum().backward()
        outs[deterministic] = [y, xx.grad] + [p.grad for p in model.parameters()]
    for a, r in zip(outs[False], outs[True], strict=True):
        assert rel_err(a, r) < TOLERANCE[torch.float64]
    inputs = make_inputs(CASES["tokens7"], torch.float64)
    args = tuple(inputs[n] for n in ("x", "gates", "indices", "U", "V", "b_dec"))
    torch.library.opcheck(lowrank_mixture_triton, args, {"deterministic": False})
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        MOLT(cfg, deterministic=1)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        MF.lowrank_mixture(*args, deterministic="no")


# -- configs and GPU builds ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n_tokens", [0, 3, 300, 100_000])
@pytest.mark.parametrize("ranks", [(1,), (32, 48, 512)])
def test_mixture_config_is_valid(ranks: tuple, n_tokens: int, dtype: torch.dtype) -> None:
    cfg = configs.mixture_config(n_tokens, 8, ranks, [3] * len(ranks), 2304, 7, dtype)
    lay = cfg.layout
    assert configs.MIN_TILE <= lay.block_m <= configs.MAX_BLOCK_M
    assert lay.n_ranges * lay.range_tokens >= n_tokens
    for launch in (cfg.shrink_fwd, cfg.expand_fwd, cfg.shrink_bwd, cfg.expand_bwd,
                   cfg.grad_u, cfg.grad_v):
        assert all(t >= configs.MIN_TILE for t in launch.tiles.values())
        assert launch.tiles["BLOCK_M"] == lay.block_m
        assert launch.num_stages >= 1
    assert lay.block_m % cfg.grad_u.tiles["BLOCK_K"] == 0


def test_block_m_follows_rows_per_segment() -> None:
    sizes = [configs.mixture_layout(n, 32, (512, 32), (16, 256), 2304, torch.bfloat16).block_m
             for n in (64, 4096, 1 << 20)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_gpu_report_builds_cover_every_kernel() -> None:
    builds = lowrank_builds.gpu_report_builds()
    names = {b.name for b in builds}
    assert names == {"lowrank_shrink", "lowrank_expand", "lowrank_xty", "lowrank_xty_plan",
                     "lowrank_xty_reduce", "lowrank_fixed_prologue", "lowrank_fixed_finish"}
    for build in builds:
        assert list(build.signature) == build.fn.arg_names


def test_biggest_tile_compiles_to_wgmma_without_spills() -> None:
    # compile_builds compiles in fresh workers without the interpreter, so it works from here.
    from molt_kernels.tools.gpu_report import check_limits, compile_builds

    big = next(
        b
        for b in lowrank_builds.gpu_report_builds()
        if b.name == "lowrank_shrink" and b.config.startswith("bf16,BACKWARD=1")
        and "BLOCK_M=128" in b.config and "sm_90" in b.archs
    )
    (row,) = compile_builds([big], ["sm_90"], jobs=1)
    assert check_limits(row) == [] and row.wgmma


def test_torch_compile_traces_the_whole_module() -> None:
    """MOLT on the triton backend (gate op + routing + decode op) compiles with fullgraph=True
    and gives the eager results bitwise, forward and every gradient."""
    cfg = MOLTConfig(d_in=16, rank_counts={8: 3, 4: 5}, k=3)
    layer = MOLT(cfg, backend="triton")
    x = torch.randn(7, 16)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp).square().sum()

    eager = loss(x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert torch.equal(compiled, eager)
    for p, g in zip(layer.parameters(), eager_grads):
        assert torch.equal(p.grad, g)
