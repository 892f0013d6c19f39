"""Fused Triton gate (molt_kernels.ops.gate_topk.autograd) against the float64 reference, on CPU
under TRITON_INTERPRET=1. Shapes stay small: the interpreter runs every program in Python."""

import pytest
import torch

pytest.importorskip("triton")

from molt_kernels.ops import configs  # noqa: E402
from molt_kernels.ops.gate_topk import builds as gate_builds  # noqa: E402
from molt_kernels.ops.gate_topk.autograd import gate_topk_triton  # noqa: E402
from molt_kernels.ops.gate_topk.reference import gate_topk_reference  # noqa: E402
from molt_kernels.tools.testing import TOLERANCE, relative_error  # noqa: E402

GRAD_NAMES = ("x", "W_gate", "b_gate", "log_threshold")
BANDWIDTH = 0.5  # wide, so that the threshold's straight-through window catches pairs


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch):
    """Every torch.empty during a test comes back full of NaN (floats) or a huge key (ints), so an
    element a kernel forgets to write shows up in the results."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 2**62 - 1)

    monkeypatch.setattr(torch, "empty", poisoned)


def make_inputs(n, d, n_t, dtype=torch.float32, w_dtype=None, seed=0):
    """x [n, d], W [n_t, d], b [n_t], log_threshold [n_t]: thresholds near the logits' scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    W = (torch.randn(n_t, d, generator=gen) / d**0.5).to(w_dtype or dtype)
    b = (0.3 * torch.randn(n_t, generator=gen)).to(w_dtype or dtype)
    log_threshold = (torch.log(torch.tensor(0.5)) + 0.3 * torch.randn(n_t, generator=gen)).to(
        w_dtype or dtype
    )
    return x, W, b, log_threshold


def run(fn, inputs, k, activation, cotangent=None, **kwargs):
    """gates, indices and the gradients of <gates, cotangent> w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    gates, indices = fn(*leaves[:3], k, activation, leaves[3], BANDWIDTH, **kwargs)
    if cotangent is None:
        cotangent = torch.randn(gates.shape, generator=torch.Generator().manual_seed(1))
    (gates * cotangent.to(gates.dtype)).sum().backward()
    grads = {name: leaf.grad for name, leaf in zip(GRAD_NAMES, leaves)}
    return gates.detach(), indices, grads, cotangent


def check_against_reference(inputs, k, activation, tol, kernel_inputs=None, **kwargs):
    """Indices equal to the float64 reference's (same order, so the same set and tie-breaks);
    gates and every gradient within ``tol`` relative error. ``kernel_inputs`` default to
    ``inputs`` (the reference sees them in float64)."""
    gates, indices, grads, cot = run(gate_topk_triton, kernel_inputs or inputs, k, activation,
                                     **kwargs)
    ref_inputs = [t.double() for t in inputs]
    ref_gates, ref_indices, ref_grads, _ = run(gate_topk_reference, ref_inputs, k, activation,
                                               cotangent=cot.double())
    assert torch.equal(indices, ref_indices)
    assert relative_error(gates, ref_gates) < tol
    for name in GRAD_NAMES:
        if activation != "jumprelu" and name == "log_threshold":
            assert grads[name] is None and ref_grads[name] is None
            continue
        assert grads[name].dtype == (kernel_inputs or inputs)[GRAD_NAMES.index(name)].dtype
        assert relative_error(grads[name], ref_grads[name]) < tol, name
    return gates, indices, grads


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "identity"])
@pytest.mark.parametrize(
    "n, d, n_t, k",
    [(7, 33, 40, 8), (1, 5, 300, 20), (9, 16, 24, 24), (5, 1, 1, 1), (3, 8, 270, 256)],
)
def test_matches_reference_fp32(activation, n, d, n_t, k):
    inputs = make_inputs(n, d, n_t)
    gates, _, _ = check_against_reference(inputs, k, activation, TOLERANCE[torch.float32])
    assert gates.dtype == torch.float32 and gates.shape == (n, k)


def test_k_beyond_the_register_list_takes_the_dense_fallback():
    k = configs.MAX_K_PAD + 4
    assert configs.fwd_config(k, torch.float32) is None
    inputs = make_inputs(3, 8, k + 10)
    check_against_reference(inputs, k, "jumprelu", TOLERANCE[torch.float32])


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_matches_reference_other_dtypes(activation, dtype):
    inputs = make_inputs(7, 24, 50, dtype)
    gates, _, _ = check_against_reference(inputs, 12, activation, TOLERANCE[dtype])
    assert gates.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_fp32_parameters_under_bf16_input():
    """Parameters stay fp32; the forward's matmul reads W rounded to bf16 (as autocast would), so
    the reference sees that rounding (to nearest; triton 3.9's interpreter truncates instead, which
    stays within the bf16 tolerance); dx multiplies by W as stored (within the same tolerance of
    the rounded W; tests/test_precision.py checks it against the unrounded one); gradients come
    back in each input's own dtype."""
    x, W, b, lt = make_inputs(7, 24, 50, torch.bfloat16, w_dtype=torch.float32)
    seen = (x, W.bfloat16().float(), b, lt)
    check_against_reference(seen, 12, "jumprelu", TOLERANCE[torch.bfloat16],
                            kernel_inputs=(x, W, b, lt))


@pytest.mark.parametrize("k", [1, 7, 32])
def test_split_t_matches_one_pass_bitwise(k):
    inputs = make_inputs(7, 12, 300, seed=k)
    one = run(gate_topk_triton, inputs, k, "jumprelu", split_t=1)
    split = run(gate_topk_triton, inputs, k, "jumprelu", split_t=3)
    assert torch.equal(one[1], split[1]) and torch.equal(one[0], split[0])
    check_against_reference(inputs, k, "jumprelu", TOLERANCE[torch.float32], split_t=3)


def test_ties_go_to_the_lower_transform_id():
    """Integer inputs give exactly equal logits: the order must follow the reference's stable
    sort, lower id first, including among the zeros relu makes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (7, 6), generator=gen).float()
    W = torch.randint(-1, 2, (40, 6), generator=gen).float()
    b = torch.zeros(40)
    lt = torch.zeros(40)
    for activation in ("relu", "identity"):
        check_against_reference((x, W, b, lt), 16, activation, TOLERANCE[torch.float32])
    # -0.0 and +0.0 are one value: relu(-0.0) must tie with relu(+0.0) by id.
    signed_zero = torch.tensor([[1.0]])
    W0 = torch.tensor([[-0.0], [0.0], [-0.0], [0.0]])
    _, idx, _, _ = run(gate_topk_triton, (signed_zero, W0, torch.zeros(4), torch.zeros(4)), 4,
                       "identity")
    assert idx.tolist() == [[0, 1, 2, 3]]


def test_jumprelu_threshold_gradient_reaches_zero_gates():
    """With k above the number of open gates, selected pairs have gate 0 and pre just below theta:
    their straight-through term needs pre recomputed."""
    x, W, b, lt = make_inputs(7, 16, 40)
    lt = torch.full_like(lt, 0.0)  # theta = 1: most gates shut
    _, _, grads = check_against_reference((x, W, b, lt), 32, "jumprelu", TOLERANCE[torch.float32])
    assert grads["log_threshold"].abs().sum() > 0


def test_hot_transform_gradients():
    """All tokens pick transform 2: its pairs span more than one dW program (chunk reduction)."""
    x, W, b, lt = make_inputs(300, 6, 5)
    b[2] = 100.0
    check_against_reference((x, W, b, lt), 2, "relu", TOLERANCE[torch.float32])


@pytest.mark.parametrize("k", [None, 3])
def test_zero_tokens(k):
    x, W, b, lt = make_inputs(0, 8, 5)
    gates, indices, grads, _ = run(gate_topk_triton, (x, W, b, lt), k, "jumprelu")
    width = 5 if k is None else k
    assert gates.shape == (0, width) and indices.shape == (0, width)
    assert grads["x"].shape == (0, 8)
    for name in ("W_gate", "b_gate", "log_threshold"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name]))


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_all_transforms_when_k_is_none(activation):
    inputs = make_inputs(7, 9, 70)
    gates, indices, _ = check_against_reference(inputs, None, activation,
                                                 TOLERANCE[torch.float32])
    assert gates.shape == (7, 70)
    assert torch.equal(indices, torch.arange(70).expand(7, 70))


def test_runs_are_bitwise_deterministic():
    inputs = make_inputs(300, 6, 5)
    inputs[2][1] = 100.0  # every token picks transform 1: its dW is reduced in chunks
    first = run(gate_topk_triton, inputs, 3, "jumprelu", split_t=2)
    second = run(gate_topk_triton, inputs, 3, "jumprelu", split_t=2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in GRAD_NAMES:
        assert torch.equal(first[2][name], second[2][name]), name


def test_nan_in_one_token_leaves_the_others_unchanged():
    x, W, b, lt = make_inputs(7, 8, 30)
    clean = run(gate_topk_triton, (x, W, b, lt), 5, "relu")
    x_bad = x.clone()
    x_bad[3, 2] = float("nan")
    bad = run(gate_topk_triton, (x_bad, W, b, lt), 5, "relu")
    others = [i for i in range(7) if i != 3]
    assert torch.equal(clean[0][others], bad[0][others])
    assert torch.equal(clean[1][others], bad[1][others])
    # As torch.sort ranks NaN first, the reference picks the lowest ids for the NaN token.
    assert bad[1][3].tolist() == [0, 1, 2, 3, 4] and bad[0][3].isnan().all()


def test_bad_arguments_are_clear_errors():
    x, W, b, lt = make_inputs(2, 4, 6)
    with pytest.raises(ValueError, match="activation"):
        gate_topk_triton(x, W, b, 2, "gelu", None, BANDWIDTH)
    with pytest.raises(ValueError, match="log_threshold"):
        gate_topk_triton(x, W, b, 2, "jumprelu", None, BANDWIDTH)
    with pytest.raises(ValueError, match="k must be"):
        gate_topk_triton(x, W, b, 7, "relu", None, BANDWIDTH)


def test_configs_fit_the_selection_kernel():
    """Every k in range gets a tile that holds its list; beyond MAX_K_PAD, and for fp64 (exact
    ranking), the dense fallback takes it."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k in range(1, configs.MAX_K_PAD + 1):
            cfg = configs.fwd_config(k, dtype)
            assert cfg.k_pad >= k and cfg.block_t >= cfg.k_pad
        assert configs.fwd_config(configs.MAX_K_PAD + 1, dtype) is None
    assert all(configs.fwd_config(k, torch.float64) is None for k in (1, 8, configs.MAX_K_PAD))
    names = {b.name for b in gate_builds.gpu_report_builds()}
    assert {"gate_topk_fwd", "gate_topk_merge", "gate_bwd_dx", "gate_bwd_dw"} <= names


def test_torch_compile_fullgraph_forward_and_backward():
    inputs = make_inputs(5, 8, 20)
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def loss(x, W, b, lt):
        gates, indices = gate_topk_triton(x, W, b, 4, "jumprelu", lt, BANDWIDTH)
        return (gates * (indices + 1)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    expected = [t.clone().requires_grad_(True) for t in inputs]
    loss(*expected).backward()
    for got, want in zip(leaves, expected):
        assert torch.equal(got.grad, want.grad)


def test_opcheck():
    x, W, b, lt = make_inputs(3, 4, 9)
    args = (x, W.requires_grad_(), b, lt.requires_grad_(), 4, "jumprelu", BANDWIDTH, 0, False)
    torch.library.opcheck(torch.ops.molt_kernels.gate_topk.default, args)
