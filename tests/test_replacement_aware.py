"""Replacement-aware training: the straight-through estimator against its definition, the
separation of the LM loss from the MOLTs' local objective, the schedule, and the small GPT."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from molt_kernels.interp.models.gpt import GPT, GPTMLP, GPTConfig, gpt_mlp_path
from molt_kernels.interp.objective import output_weights
from molt_kernels.interp.replace import get_module, replaced
from molt_kernels.interp.replacement_aware import PhaseIn, ReplacementAware
from molt_kernels.interp.train import TrainConfig
from molt_kernels.layers.config import MOLTConfig
from molt_kernels.layers.molt import MOLT

PATHS = [gpt_mlp_path(0), gpt_mlp_path(1)]


def tiny_gpt() -> GPT:
    model = GPT(GPTConfig(vocab_size=50, context=12, d_model=16, n_layers=2, n_heads=2, d_mlp=32))
    return model.double()


def tiny_molts() -> dict[str, MOLT]:
    cfg = MOLTConfig(d_in=16, rank_counts={4: 3, 2: 5}, k=3)
    return {path: MOLT(cfg).double() for path in PATHS}


def tokens(batch: int = 3, length: int = 13) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length))


def model_grads(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


class ShiftedMLP(nn.Module):
    """x -> mlp(x) + shift with a constant shift: the estimator's backward graph, built by hand."""

    def __init__(self, mlp: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.mlp, self.shift = mlp, shift

    def forward(self, x):
        return self.mlp(x) + self.shift


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model, molts, batch = tiny_gpt(), tiny_molts(), tokens()
    trainer = ReplacementAware(model, molts, molt_train=TrainConfig(init_from_data=False))
    return model, molts, batch, trainer


def plain_and_spliced():
    """Seeded tiny GPT, its MOLTs and a batch, with the logits of the plain and of the fully
    spliced model (the two ends a replacement schedule mixes between)."""
    torch.manual_seed(0)
    model, molts, batch = tiny_gpt(), tiny_molts(), tokens()
    with torch.no_grad():
        plain = model(batch[:, :-1])
        with replaced(model, molts):
            spliced = model(batch[:, :-1])
    return model, molts, batch, plain, spliced

def test_forward_value_is_the_spliced_models(setup):
    model, molts, batch, trainer = setup
    with trainer.installed():
        trainer.begin_step(1)
        aware = model.loss(batch)
    with torch.no_grad(), replaced(model, molts):
        spliced = model.loss(batch)
    assert aware.item() == spliced.item()


def test_estimator_gradients_match_the_explicit_construction(setup):
    """Every model gradient equals the gradient of the loss of the model whose MLP l outputs
    mlp_l(x) + c_l, with c_l = molt_l(x_l) - mlp_l(x_l) held constant at the spliced forward."""
    model, molts, batch, trainer = setup
    with trainer.installed():
        trainer.begin_step(1)
        model.loss(batch).backward()
    aware = model_grads(model)
    assert all(p.grad is None for m in molts.values() for p in m.parameters())

    # The explicit construction: record each MLP input of the spliced model, then shift.
    inputs = {}
    hooks = [
        molt.register_forward_hook(lambda m, a, o, p=p: inputs.__setitem__(p, a[0].detach()))
        for p, molt in molts.items()
    ]
    with torch.no_grad(), replaced(model, molts):
        model.loss(batch)
    for h in hooks:
        h.remove()
    shifted = {}
    with torch.no_grad():
        for path, molt in molts.items():
            mlp = get_module(model, path)
            shifted[path] = ShiftedMLP(mlp, molt(inputs[path]) - mlp(inputs[path]))
    model.zero_grad(set_to_none=True)
    with replaced(model, shifted):
        loss = model.loss(batch)
    loss.backward()
    explicit = model_grads(model)
    assert aware.keys() == explicit.keys()
    for name in aware:
        torch.testing.assert_close(aware[name], explicit[name], rtol=1e-10, atol=1e-13)


def test_mlp_gradient_is_the_lm_gradient_at_its_output_through_the_mlp(setup):
    """The definition for one replaced MLP: grad theta_F = (dF/dtheta_F)^T (dL/d out), with
    dL/d out taken in the model that runs the MOLT there."""
    model, molts, batch, _ = setup
    path = PATHS[1]
    trainer = ReplacementAware(
        model, {path: molts[path]}, molt_train=TrainConfig(init_from_data=False)
    )
    with trainer.installed():
        trainer.begin_step(1)
        model.loss(batch).backward()
    mlp = get_module(model, path)
    aware = [p.grad.clone() for p in mlp.parameters()]

    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["x"], seen["out"] = args[0].detach(), output

    hook = molts[path].register_forward_hook(keep)
    with replaced(model, {path: molts[path]}):
        loss = model.loss(batch)
    hook.remove()
    (dl_dout,) = torch.autograd.grad(loss, seen["out"])
    explicit = torch.autograd.grad(mlp(seen["x"]), list(mlp.parameters()), grad_outputs=dl_dout)
    for a, e in zip(aware, explicit, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def test_molts_get_no_lm_gradient_and_the_model_no_local_gradient(setup):
    model, molts, batch, trainer = setup
    own = dict(model.named_parameters())  # before installing: the model's parameters only
    molt_params = [p for m in molts.values() for p in m.parameters()]
    with trainer.installed():
        trainer.begin_step(1)
        lm = model.loss(batch)
        local = trainer.local_loss()
        lm.backward(retain_graph=True)
        assert all(p.grad is None for p in molt_params)
        lm_only = {name: p.grad.clone() for name, p in own.items()}
        model.zero_grad(set_to_none=True)
        (lm + local).backward()
    for name, p in own.items():
        torch.testing.assert_close(p.grad, lm_only[name], rtol=0, atol=0)
    # ... and the MOLTs' gradients are those of their local objective alone.
    combined = [p.grad.clone() for p in molt_params]
    with trainer.installed():
        trainer.begin_step(1)
        model.loss(batch)
        alone = torch.autograd.grad(trainer.local_loss(), molt_params)
    for c, a in zip(combined, alone, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-15)


def test_local_objective_is_the_weighted_mse_plus_the_sparsity_penalty(setup):
    """The MOLTs' local objective carries the norm-scaled tanh penalty at the configured
    coefficient, and its gradient (penalty included) reaches the MOLTs alone."""
    model, molts, batch, _ = setup
    coef = 0.05
    cfg = TrainConfig(sparsity_coef=coef, sparsity_warmup_steps=1, init_from_data=False)
    trainer = ReplacementAware(model, molts, molt_train=cfg)
    own = list(model.parameters())
    molt_params = [p for m in molts.values() for p in m.parameters()]
    with trainer.installed():
        trainer.begin_step(1)
        model.loss(batch)
        lasts = {path: w.last for path, w in trainer.wrappers.items()}
        local = trainer.local_loss()
    mse, penalty = 0.0, 0.0
    for path, molt in molts.items():
        last = lasts[path]
        gates, indices = molt.encode(last.x)
        torch.testing.assert_close(gates, last.gates, rtol=0, atol=0)
        error = (molt.decode(last.x, gates, indices) - last.y).square()
        mse = mse + (error * output_weights(last.y)).mean()
        penalty = penalty + molt.sparsity_penalty(gates, indices, "tanh", 1.0)
    assert penalty > 0
    # The objective sums in float32 (objective.LayerObjective), whatever the MOLT's dtype.
    torch.testing.assert_close(local, mse + coef * penalty, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(local, own + molt_params, allow_unused=True)
    assert all(g is None for g in grads[: len(own)])
    # The penalty's share of the gradient is there: it differs from the MSE's alone.
    mse_grads = torch.autograd.grad(mse, molt_params)
    assert any(not torch.allclose(g, m) for g, m in zip(grads[len(own) :], mse_grads, strict=True))


def test_sampled_replacement_runs_the_molt_or_the_mlp_per_layer():
    model, molts, batch, plain, spliced = plain_and_spliced()
    trainer = ReplacementAware(
        model, molts, PhaseIn(start=2, ramp_steps=4), TrainConfig(init_from_data=False),
        sample=True,
    )  # fmt: skip
    draws = []
    with torch.no_grad(), trainer.installed():
        trainer.begin_step(1)  # weight 0: every layer runs its MLP
        torch.testing.assert_close(model(batch[:, :-1]), plain, rtol=0, atol=0)
        trainer.begin_step(6)  # weight 1: every layer runs its MOLT
        torch.testing.assert_close(model(batch[:, :-1]), spliced, rtol=0, atol=0)
        for _ in range(200):
            trainer.begin_step(4)  # weight 0.5
            draws.append([w.mix for w in trainer.wrappers.values()])
    draws = torch.tensor(draws)
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < draws.mean() < 0.6
    assert 0.1 < (draws[:, 0] != draws[:, 1]).double().mean()  # layers draw independently


def test_consistency_term_pulls_only_the_mlps_towards_their_molts():
    """consistency_loss() = w * a * MSE(F(sg x), sg M(sg x)) with the local objective's output
    weights; its gradient reaches the replaced MLPs' parameters and nothing else."""
    torch.manual_seed(0)
    model, molts, batch = tiny_gpt(), tiny_molts(), tokens()
    weight = 0.3
    trainer = ReplacementAware(
        model, molts, PhaseIn(start=1, ramp_steps=4), TrainConfig(init_from_data=False),
        consistency=weight,
    )  # fmt: skip
    mlp_params = {id(p) for path in PATHS for p in get_module(model, path).parameters()}
    own = list(model.parameters())
    with trainer.installed():
        trainer.begin_step(1)  # schedule weight 0: no pull yet
        model.loss(batch)
        assert trainer.consistency_loss().item() == 0.0
        trainer.begin_step(3)  # schedule weight 0.5
        model.loss(batch)
        lasts = {path: w.last for path, w in trainer.wrappers.items()}
        term = trainer.consistency_loss()
    by_hand = 0.0
    for path in PATHS:
        last = lasts[path]
        error = (get_module(model, path)(last.x) - last.pred.detach()).square()
        by_hand = by_hand + weight * 0.5 * (error * output_weights(last.y)).mean()
    torch.testing.assert_close(term, by_hand, rtol=1e-6, atol=0)  # float32 as the objective
    molt_params = [p for m in molts.values() for p in m.parameters()]
    grads = torch.autograd.grad(term, own + molt_params, allow_unused=True)
    for p, g in zip(own + molt_params, grads, strict=True):
        assert (g is not None and g.abs().sum() > 0) == (id(p) in mlp_params)


def test_schedule_mixes_the_values():
    schedule = PhaseIn(start=10, ramp_steps=20)
    assert [schedule.weight(s) for s in (0, 9, 10, 20, 30, 99)] == [0, 0, 0, 0.5, 1, 1]
    assert PhaseIn(start=5).weight(5) == 1.0
    assert [PhaseIn(0, 4, final=0.5).weight(s) for s in (0, 2, 4, 9)] == [0, 0.25, 0.5, 0.5]
    with pytest.raises(ValueError, match="start"):
        PhaseIn(start=-1)
    with pytest.raises(ValueError, match="final"):
        PhaseIn(final=0.0)

    model, molts, batch, plain, spliced = plain_and_spliced()
    trainer = ReplacementAware(
        model, molts, PhaseIn(start=1, ramp_steps=2), TrainConfig(init_from_data=False)
    )
    with torch.no_grad(), trainer.installed():
        trainer.begin_step(0)
        assert trainer.mix() == 0.0
        torch.testing.assert_close(model(batch[:, :-1]), plain, rtol=0, atol=0)
        trainer.begin_step(3)
        torch.testing.assert_close(model(batch[:, :-1]), spliced, rtol=0, atol=0)


def test_training_steps_fit_the_molts_and_restore_the_model():
    torch.manual_seed(0)
    model, molts = tiny_gpt().float(), {p: m.float() for p, m in tiny_molts().items()}
    original_mlps = [get_module(model, p) for p in PATHS]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = ReplacementAware(
        model,
        molts,
        PhaseIn(0, 5),
        TrainConfig(steps=100, lr=5e-3, sparsity_coef=0, log_every=20, dead_window_tokens=512),
    )
    with trainer.installed():
        for step in range(1, 101):
            trainer.begin_step(step)
            loss = model.loss(tokens(16)) + trainer.local_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trainer.end_step()
    assert [get_module(model, p) for p in PATHS] == original_mlps
    for log in trainer.logs.values():
        assert log.step == [20, 40, 60, 80, 100]
        assert log.fvu[-1] < 0.5 * log.fvu[0]
        assert 0 < log.l0[-1] <= 3


def test_bad_arguments():
    model, molts = tiny_gpt(), tiny_molts()
    with pytest.raises(AttributeError, match="blocks.7.mlp"):
        ReplacementAware(model, {"blocks.7.mlp": molts[PATHS[0]]})
    with pytest.raises(TypeError, match="must be a MOLT"):
        ReplacementAware(model, {PATHS[0]: nn.Linear(16, 16)})
    with pytest.raises(ValueError, match="at least one"):
        ReplacementAware(model, {})
    with pytest.raises(ValueError, match="consistency"):
        ReplacementAware(model, molts, consistency=-1.0)
    trainer = ReplacementAware(model, molts)
    with pytest.raises(RuntimeError, match="installed"):
        trainer.begin_step(1)
    with trainer.installed(), pytest.raises(RuntimeError, match="no forward"):
        trainer.begin_step(1)
        trainer.local_loss()
    with trainer.installed(), pytest.raises(RuntimeError, match="local_loss"):
        trainer.begin_step(1)
        trainer.end_step()
    narrow = MOLT(MOLTConfig(d_in=16, rank_counts={2: 2}, k=1, d_out=8))
    with (
        ReplacementAware(model, {PATHS[0]: narrow}).installed(),
        pytest.raises(ValueError, match="16 -> 8"),
    ):
        model.loss(tokens())


def test_gpt_is_causal_and_addressable():
    torch.manual_seed(0)
    model = tiny_gpt()
    batch = tokens(2, 12)
    changed = batch.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    with torch.no_grad():
        a, b = model(batch), model(changed)
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    assert isinstance(get_module(model, gpt_mlp_path(-1)), GPTMLP)
    with pytest.raises(ValueError, match="context=12"):
        model(tokens(1, 13))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=10, dropout=1.0)


def test_gpt_dropout_acts_in_training_mode_only():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, context=12, d_model=16, n_layers=2, n_heads=2, d_mlp=32)
    plain, dropped = GPT(cfg), GPT(replace(cfg, dropout=0.5))
    dropped.load_state_dict(plain.state_dict())
    batch = tokens(2, 12)
    dropped.eval()
    torch.testing.assert_close(dropped(batch), plain(batch), rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(batch), plain(batch))
