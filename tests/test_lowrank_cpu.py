"""The torch backend's CPU decode: the C++ extension (csrc/lowrank_mixture_cpu.cpp) and its
pure-PyTorch fallback, against the float64 reference. The extension is built once per session
(cached in torch's extension directory across sessions); without a compiler its cases skip."""

import pytest
import torch

import molt_kernels.layers.functional as MF
from molt_kernels.ops.lowrank_mixture import cpu
from molt_kernels.ops.lowrank_mixture import pytorch as torch_impl
from molt_kernels.tools.testing import relative_error


@pytest.fixture(params=["extension", "fallback"])
def decode_impl(request, monkeypatch):
    """Runs the test once on the C++ extension and once on the PyTorch fallback."""
    if request.param == "extension":
        if cpu.load_extension() is None:
            pytest.skip(f"CPU extension unavailable: {cpu.unavailable_reason() or 'build failed'}")
        monkeypatch.setenv(cpu.DISABLE_ENV, "1")

        def no_fallback(*args, **kwargs):
            raise AssertionError("the PyTorch decode ran although the extension is enabled")

        monkeypatch.setattr(torch_impl, "forward", no_fallback)
    else:
        monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    return request.param


def _problem(layout, n_tokens, k, d_in, d_out, routing, dtype=torch.float64):
    t = sum(layout.values())
    U = [torch.randn(n, d_out, r, dtype=dtype) for r, n in layout.items()]
    V = [torch.randn(n, r, d_in, dtype=dtype) for r, n in layout.items()]
    x = torch.randn(n_tokens, d_in, dtype=dtype)
    if routing == "all_to_one":  # transforms 0..k-1 get every token
        indices = torch.arange(k).expand(n_tokens, k).clone()
    else:
        weights = torch.ones(t)
        if routing == "zipf":
            weights = 1.0 / torch.arange(1, t + 1, dtype=torch.float64) ** 1.5
        elif routing == "empty_transforms":
            weights = torch.zeros(t)
            weights[t // 2 : t // 2 + max(k, t // 4)] = 1.0
        indices = torch.multinomial(weights.expand(max(n_tokens, 1), t), k)[:n_tokens]
    gates = torch.rand(n_tokens, k, dtype=dtype)
    gates[gates < 0.2] = 0.0  # dropped pairs
    b_dec = torch.randn(d_out, dtype=dtype)
    return x, gates, indices, U, V, b_dec


def _run(backend, x, gates, indices, U, V, b_dec, grad_y, wants=None):
    """y and every gradient; ``wants`` picks the leaves that require grad (default: all)."""
    leaves = [t.detach().clone() for t in (x, gates, b_dec, *U, *V)]
    for i, t in enumerate(leaves):
        t.requires_grad_(wants is None or i in wants)
    xx, gg, bb = leaves[:3]
    uu, vv = leaves[3 : 3 + len(U)], leaves[3 + len(U) :]
    y = MF.lowrank_mixture(xx, gg, indices, uu, vv, bb, backend=backend)
    y.backward(grad_y)
    return [y.detach()] + [t.grad for t in leaves]


def _assert_matches_reference(problem, wants=None, tol=1e-10):
    x, _, _, U, _, _ = problem
    grad_y = torch.randn(x.shape[0], U[0].shape[1], dtype=x.dtype)
    ref = _run("reference", *problem, grad_y, wants)
    got = _run("torch", *problem, grad_y, wants)
    for i, (a, b) in enumerate(zip(got, ref)):
        if b is None:
            assert a is None, i
        else:
            assert relative_error(a, b) <= tol, i
    return got


@pytest.mark.parametrize("routing", ["uniform", "zipf", "all_to_one", "empty_transforms"])
@pytest.mark.parametrize("n_tokens", [0, 1, 37, 700])
def test_forward_and_every_gradient_match_reference(decode_impl, routing, n_tokens):
    # 700 tokens all_to_one: 700 rows in one transform, past the extension's 512-row chunks.
    problem = _problem({9: 3, 40: 2, 2: 7}, n_tokens, 4, 11, 6, routing)
    got = _assert_matches_reference(problem)
    gates = problem[1]
    assert (got[2][gates == 0] == 0).all()  # zero gates are outside the sum


def test_more_than_1024_transforms_in_a_bucket(decode_impl):
    _assert_matches_reference(_problem({2: 1300, 5: 3}, 400, 6, 5, 4, "uniform"))


@pytest.mark.parametrize("wants", [(0,), (1,), (2,), (3, 4), (5, 6), (0, 4)])
def test_partial_gradients(decode_impl, wants):
    # Leaves: x, gates, b_dec, U[0], U[1], V[0], V[1]; only some require grad.
    _assert_matches_reference(_problem({4: 5, 2: 6}, 50, 3, 7, 5, "uniform"), wants)


def test_float32_matches_reference(decode_impl):
    problem = _problem({16: 4, 4: 12}, 300, 4, 24, 20, "zipf", dtype=torch.float32)
    ref64 = _run(
        "reference", *[_to64(t) for t in problem], torch.ones(300, 20, dtype=torch.float64)
    )
    got = _run("torch", *problem, torch.ones(300, 20))
    for a, b in zip(got, ref64):
        assert relative_error(a.double(), b) <= 1e-5


def _to64(t):
    if isinstance(t, list):
        return [u.double() for u in t]
    return t.double() if t.is_floating_point() else t


def test_bitwise_deterministic_across_runs_and_thread_counts(decode_impl):
    # The decode alone: the gate's dense F.linear backward is MKL's, whose dW reduction order
    # follows the thread count.
    problem = _problem({16: 4, 8: 8, 4: 16}, 1500, 4, 48, 40, "zipf", dtype=torch.float32)
    grad_y = torch.randn(1500, 40)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            runs.append(_run("torch", *problem, grad_y))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_extension_and_fallback_agree(monkeypatch):
    if cpu.load_extension() is None:
        pytest.skip("CPU extension unavailable")
    problem = _problem({8: 6, 3: 10}, 200, 4, 12, 10, "zipf")
    grad_y = torch.randn(200, 10, dtype=torch.float64)
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    ext = _run("torch", *problem, grad_y)
    monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    fallback = _run("torch", *problem, grad_y)
    for a, b in zip(ext, fallback):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # same kernels: exact


def test_disabled_by_environment(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    assert not cpu.usable_for(x)
    assert not cpu.usable_for(x.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_topk_follows_the_tie_rule(decode_impl, dtype):
    """The C++ selection (fp32, fp64) and the PyTorch one (fp32 packed keys, fp64 order keys)."""
    from molt_kernels.ops.gate_topk import pytorch as gate

    for trial in range(30):
        n, t = 40, int(torch.randint(8, 300, ()))
        k = int(torch.randint(1, min(t, 40), ()))
        v = torch.randn(n, t, dtype=dtype)
        if trial % 3:  # relu's ties at zero; else negative values too
            v = v.relu()
        v[torch.rand(n, t) < 0.1] = float("nan") if trial % 2 else 0.5
        for special in (float("inf"), -0.0, -float("inf")):
            v[torch.rand(n, t) < 0.05] = special
        exact = gate._topk_lowest_index_exact(torch.nan_to_num(v, nan=float("inf")), k)
        assert torch.equal(gate.topk_lowest_index(v, k), exact), trial


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_compiles_with_fullgraph(decode_impl, dtype):
    # The gate's top-k (no data-dependent branch while compiling) and either decode trace as one
    # graph: the extension's h_pre length, and the PyTorch decode's used blocks per bucket (read
    # with .tolist()), are unbacked sizes returned as outputs of the autograd Function.
    from molt_kernels import MOLT, MOLTConfig

    torch._dynamo.reset()
    cfg = MOLTConfig(d_in=16, rank_counts={8: 3, 4: 6}, k=3)
    layer = MOLT(cfg, backend="torch", dtype=dtype)
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        acts = torch.relu(torch.nn.functional.linear(x, layer.W_gate, layer.b_gate))
    assert ((acts > 0).sum(1) < cfg.k).any()  # some rows take the gate's tie-exact path

    def step(f):
        layer.zero_grad()
        x.grad = None
        y = f(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # same kernels: exact


def test_extension_phases_run_on_every_thread():
    # at::parallel_for is serial in a file built without OpenMP: a build without -fopenmp would
    # pass every correctness test and run each phase on one thread.
    if cpu.load_extension() is None:
        pytest.skip("CPU extension unavailable")
    if not torch.backends.openmp.is_available():
        pytest.skip("torch built without OpenMP")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.ops.molt_kernels.parallel_region_threads() == n
    finally:
        torch.set_num_threads(threads)
