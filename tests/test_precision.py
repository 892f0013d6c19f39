"""Precision of the triton backend (interpreter): fp32 master weights under bf16 activations are
read as they are (no cast ops of the weights in a step; forward and every gradient against the
float64 reference, gradients in fp32), and the TF32 opt-in (it reaches every dot kernel, fp32
results under the interpreter are unchanged, and the sm_80/sm_90 builds multiply in tf32)."""

import pytest
import torch

pytest.importorskip("triton")

from molt_kernels import MOLT, MOLTConfig  # noqa: E402
from molt_kernels.layers import functional as MF  # noqa: E402
from molt_kernels.ops import configs  # noqa: E402
from molt_kernels.tools.step_report import count_step  # noqa: E402

BF16_TOL = 2e-2
# aten ops that copy a tensor into another dtype (or at all): none may read a weight in a step.
CAST_OPS = {"_to_copy", "to", "copy_", "_copy_from", "clone", "type_as"}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().norm().item()
    return (a.double() - ref.double()).norm().item() / max(scale, 1e-30)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def test_decode_bf16_activations_fp32_weights_against_float64() -> None:
    torch.manual_seed(0)
    n, d_in, d_out, k, ranks = 80, 24, 20, 3, {8: 3, 16: 2, 4: 4}
    n_t = sum(ranks.values())
    x = _leaf(torch.randn(n, d_in).bfloat16())
    gates = _leaf(torch.randn(n, k))
    indices = torch.rand(n, n_t).argsort(1)[:, :k]
    U = [_leaf(torch.randn(c, d_out, r) / r**0.5) for r, c in ranks.items()]
    V = [_leaf(torch.randn(c, r, d_in) / d_in**0.5) for r, c in ranks.items()]
    b_dec = _leaf(torch.randn(d_out))
    leaves = [x, gates, b_dec, *U, *V]
    projection = torch.randn(n, d_out, dtype=torch.float64)

    y = MF.lowrank_mixture(x, gates, indices, U, V, b_dec, backend="triton")
    got = [y, *_grads((y.double() * projection).sum(), leaves)]
    ref_leaves = [_leaf(t.double()) for t in leaves]
    rx, rg, rb, *ruv = ref_leaves
    y_ref = MF.lowrank_mixture(rx, rg, indices, ruv[:3], ruv[3:], rb, backend="reference")
    want = [y_ref, *_grads((y_ref * projection).sum(), ref_leaves)]

    names = ["y", "dx", "dgates", "db_dec"] + [f"dU[{i}]" for i in range(3)]
    names += [f"dV[{i}]" for i in range(3)]
    assert y.dtype == torch.bfloat16
    for name, g, r, leaf in zip(names, got, want, [x, *leaves], strict=True):
        if name != "y":
            # Gradients come back in each input's own dtype: fp32 for the master weights.
            assert g.dtype == leaf.dtype, name
        assert rel_err(g, r) < BF16_TOL, f"{name}: {rel_err(g, r):.2e}"


@pytest.mark.parametrize(
    "n_t, k", [(12, 3), (40, 2)], ids=["dense-gemm-backward", "sparse-backward"]
)
def test_gate_bf16_activations_fp32_weights_against_float64(n_t: int, k: int) -> None:
    """Gates and gradients of x, W_gate, b_gate against float64 at the selected transforms."""
    dense = n_t <= configs.DENSE_GATE_BACKWARD_RATIO * k
    assert dense == (n_t == 12)  # both backward paths are covered
    torch.manual_seed(1)
    n, d_in = 70, 40
    x = _leaf(torch.randn(n, d_in).bfloat16())
    W = _leaf(torch.randn(n_t, d_in) / d_in**0.5)
    b = _leaf(torch.randn(n_t) * 0.1)
    gates, indices = MF.gate_topk(x, W, b, k, backend="triton")
    projection = torch.randn(n, k, dtype=torch.float64)
    got = [gates, *_grads((gates.double() * projection).sum(), [x, W, b])]
    rx, rW, rb = (_leaf(t.double()) for t in (x, W, b))
    ref = torch.relu(rx @ rW.T + rb).gather(1, indices)
    want = [ref, *_grads((ref * projection).sum(), [rx, rW, rb])]
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    for name, g, r in zip(["gates", "dx", "dW_gate", "db_gate"], got, want, strict=True):
        assert rel_err(g, r) < BF16_TOL, f"{name}: {rel_err(g, r):.2e}"


def _layer(**cfg) -> MOLT:
    torch.manual_seed(2)
    return MOLT(MOLTConfig(d_in=32, rank_counts={8: 3, 4: 4}, k=3, **cfg), backend="triton")


def test_step_makes_no_cast_of_the_fp32_weights() -> None:
    """A forward+backward step of an fp32 layer on bf16 activations reads its weights only in the
    kernels (and the gate backward's matmuls), never through a cast: no per-call weight copies."""
    layer = _layer()
    weights = list(layer.parameters())
    assert {w.dtype for w in weights} == {torch.float32}
    x = torch.randn(64, 32).bfloat16().requires_grad_()
    layer(x).float().square().sum().backward()  # warm-up: per-shape tables are cached
    layer.zero_grad()
    with count_step(watch=weights) as counts:
        layer(x).float().square().sum().backward()
    assert not CAST_OPS & set(counts.watched_ops), counts.watched_ops
    assert counts.launches  # the step did run the kernels
    for w in weights:
        assert w.grad is not None and w.grad.dtype == torch.float32
    # The watch sees casts when there are some (the check above can fail).
    with count_step(watch=weights[:1]) as control:
        weights[0].to(torch.bfloat16)
    assert control.watched_ops["_to_copy"] == 1


@pytest.fixture
def dot_precisions(monkeypatch: pytest.MonkeyPatch) -> dict[str, set]:
    """kernel name -> the PRECISION constexprs it was launched with (interpreter launches)."""
    from triton.runtime import interpreter

    seen: dict[str, set] = {}
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        if "PRECISION" in kwargs:
            seen.setdefault(self.fn.__name__, set()).add(kwargs["PRECISION"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    return seen


DOT_KERNELS = {"_gate_topk_fwd_kernel", "_shrink_kernel", "_expand_kernel", "_xty_kernel"}


@pytest.fixture
def torch_allows_tf32():
    """torch's own switch for fp32 CUDA matmuls on (the legacy setter, which every reader of the
    flag accepts), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def _step(layer: MOLT, x: torch.Tensor) -> None:
    layer(x).float().square().sum().backward()


def test_tf32_is_off_by_default(dot_precisions) -> None:
    _step(_layer(), torch.randn(16, 32))
    assert set(dot_precisions) == DOT_KERNELS
    assert all(p == {"ieee"} for p in dot_precisions.values()), dot_precisions


def test_tf32_follows_torch_switch(dot_precisions, torch_allows_tf32) -> None:
    _step(_layer(), torch.randn(16, 32))
    assert set(dot_precisions) == DOT_KERNELS
    assert all(p == {"tf32"} for p in dot_precisions.values()), dot_precisions


def test_explicit_allow_tf32_overrides_torch_switch(dot_precisions, torch_allows_tf32) -> None:
    layer = _layer()
    weights = (layer.W_gate, layer.b_gate, list(layer.U), list(layer.V), layer.b_dec)
    MF.molt(torch.randn(16, 32), *weights, k=3, backend="triton", allow_tf32=False).sum().backward()
    assert all(p == {"ieee"} for p in dot_precisions.values()), dot_precisions


def test_tf32_never_applies_to_half_inputs(dot_precisions) -> None:
    layer = _layer()
    weights = (layer.W_gate, layer.b_gate, list(layer.U), list(layer.V), layer.b_dec)
    x = torch.randn(16, 32).bfloat16()
    MF.molt(x, *weights, k=3, backend="triton", allow_tf32=True).float().sum().backward()
    assert all(p == {"ieee"} for p in dot_precisions.values()), dot_precisions


def test_allow_tf32_is_validated() -> None:
    layer = _layer()
    with pytest.raises(TypeError, match="allow_tf32 must be a bool or None"):
        MF.gate_topk(torch.randn(4, 32), layer.W_gate, layer.b_gate, 2, allow_tf32="yes")


def test_fp32_results_unchanged_under_the_interpreter_with_tf32() -> None:
    """The interpreter multiplies fp32 dots exactly whatever input_precision says, so TF32 on
    must give the fp32 results bitwise there (the GPU rounds operands to tf32; see the builds)."""
    results = []
    for allow_tf32 in (False, True):
        layer = _layer()
        x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
        weights = (layer.W_gate, layer.b_gate, list(layer.U), list(layer.V), layer.b_dec)
        y = MF.molt(x, *weights, k=3, backend="triton", allow_tf32=allow_tf32)
        y.square().sum().backward()
        results.append([y, x.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_tf32_builds_multiply_in_tf32() -> None:
    """Compiled for real targets (no GPU needed): the fp32 builds with TF32 on run tf32 MMAs
    (mma.sync on sm_80, wgmma on sm_90 for a 64-row tile); true fp32 runs on the FMA units."""
    from molt_kernels.ops.gate_topk.builds import gpu_report_builds
    from molt_kernels.tools.gpu_report import check_limits, compile_builds

    dense = [
        b
        for b in gpu_report_builds()
        if b.name == "gate_dense_fwd" and b.config.startswith("fp32,")
    ]
    tf32 = next(b for b in dense if b.config.startswith("fp32,tf32,"))
    ieee = next(b for b in dense if not b.config.startswith("fp32,tf32,"))
    assert tf32.dot_rows >= 64 and tf32.dot_input == "tf32"
    rows = compile_builds([tf32, ieee], ["sm_80", "sm_90"], jobs=2)
    mma = {(row.config == tf32.config, row.arch): row.mma for row in rows}
    assert mma[True, "sm_80"] == "mma.tf32"
    assert mma[True, "sm_90"] == "wgmma.tf32"
    assert mma[False, "sm_80"] == "" and mma[False, "sm_90"] == ""
    assert all(check_limits(row) == [] for row in rows), rows
