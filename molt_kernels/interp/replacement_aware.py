"""Replacement-aware training: train a model whose MLPs stay replaceable by their MOLTs.

Quantization-aware training, with MOLTs in the role of the quantized weights. While a
:class:`ReplacementAware` trainer is installed, each chosen MLP ``F`` (any module that
``molt_kernels.interp.replace`` can address) is wrapped in a :class:`StraightThroughMOLT` with
its MOLT ``M``. For a block input ``x`` and mixing weight ``a`` in [0, 1] (from a
:class:`PhaseIn` schedule):

    forward value    out = a * M(sg(x)) + (1 - a) * F(x)         (exactly M(x) at a = 1)
    written as       out = sg(a * M(sg(x)) + (1 - a) * F(x)) + (F(x) - sg(F(x)))
    backward         d out / d theta_F = d F(x) / d theta_F,  d out / d x = d F(x) / d x,
                     d out / d theta_M = 0

where ``sg`` is stop-gradient (``detach``). So the language-model loss ``L`` is computed
through the MOLT's output, and its gradient ``g = dL/d out`` (evaluated at that forward) is
back-propagated through the MLP as if the MLP had produced ``out``: theta_F gets
``(dF/d theta_F)^T g`` and the block input gets ``J_F(x)^T g`` -- the MLP's Jacobian, not the
MOLT's. This is the straight-through estimator of QAT with ``F`` as the full-precision master.

Each MOLT sees its input detached and learns only from its own local objective on the same
forward pass: ``objective.LayerObjective`` of ``M(sg(x))`` against ``sg(F(x))`` -- MSE with each
output dim weighted by 1 / its variance over the batch (``objective.output_weights``), plus the
Frobenius-scaled sparsity penalty, its coefficient warmed up as in ``train.train``. ``M`` gets no
gradient from ``L``, and the local objective sends none into the model. The two losses' graphs
are disjoint, so one ``(lm_loss + trainer.local_loss()).backward()`` computes both sets of
gradients exactly as two separate backward passes would. MOLT optimisation follows a
``train.TrainConfig`` (AdamW, learning-rate and sparsity warm-up, data-aware init on the first
batch, dead-gate reopening).

Two optional variants, both off by default:

- ``sample=True`` replaces the blend by a draw: at each step each layer independently runs its
  MOLT (``a = 1``) with probability equal to the schedule's weight, else its MLP (``a = 0``),
  as quantization noise (Fan et al., 2020) quantizes a random part of the weights each step; in
  expectation the forward value is the blend's. The model keeps training through its own MLPs
  on part of the steps, so their own loss is trained as well as the spliced model's.
- ``consistency=w`` adds ``w * a * MSE(F(sg(x)), sg(M(sg(x))))`` (the local objective's output
  weighting, ``a`` the schedule's weight) to ``consistency_loss()``: a pull of each MLP's
  parameters towards its MOLT's output that involves no language-model loss and no gradient
  into the MOLT or into the MLP's input.

Usage (build the model's optimizer *before* installing: while installed, ``model.parameters()``
also yields the MOLTs' parameters)::

    opt = torch.optim.AdamW(model.parameters())
    trainer = ReplacementAware(model, {path: MOLT(cfg) for path in paths}, PhaseIn(0, 200))
    with trainer.installed():
        for step in range(1, n_steps + 1):
            trainer.begin_step(step)
            loss = lm_loss(model, batch) + trainer.local_loss() + trainer.consistency_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trainer.end_step()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers.molt import MOLT
from .metrics import DeadTracker
from .objective import LayerObjective, output_weights
from .replace import get_module, replaced
from .schedules import linear_warmup, lr_factor
from .train import TrainConfig, TrainLog, init_from_data, reopen_dead


@dataclass(frozen=True)
class PhaseIn:
    """Mixing weight of the replacement over steps: 0 before ``start``, rising linearly to
    ``final`` over ``ramp_steps`` steps after it (``ramp_steps=0``: jumps to ``final`` at
    ``start``). ``final`` < 1 keeps a ``1 - final`` share of the MLP to the end."""

    start: int = 0
    ramp_steps: int = 0
    final: float = 1.0

    def __post_init__(self) -> None:
        if self.start < 0 or self.ramp_steps < 0:
            raise ValueError(f"PhaseIn start and ramp_steps must be >= 0, got {self}")
        if not 0.0 < self.final <= 1.0:
            raise ValueError(f"PhaseIn final must be in (0, 1], got {self.final!r}")

    def weight(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if self.ramp_steps == 0:
            return self.final
        return self.final * min(1.0, (step - self.start) / self.ramp_steps)


@dataclass
class LocalBatch:
    """What one forward of a :class:`StraightThroughMOLT` leaves for the MOLT's update:
    the detached MLP input x [n, d_in] and output y [n, d_out], the MOLT's local objective
    (0-d) and output pred [n, d_out] (both with grad to its parameters only), its
    (gates, indices) [n, k], and the consistency term (0-d, grad to the MLP's parameters only;
    None when its weight is 0)."""

    x: Tensor
    y: Tensor
    loss: Tensor
    pred: Tensor
    gates: Tensor
    indices: Tensor
    consistency: Tensor | None


class StraightThroughMOLT(nn.Module):
    """Stands in for ``mlp``: the value is ``molt``'s (mixed with the MLP's by ``mix``), the
    gradient the MLP's. See the module docstring for the exact estimator.

    Each forward also evaluates the MOLT's local objective (``sparsity_coef`` times the penalty
    of ``cfg``'s form) and leaves it with the batch in ``last`` (:class:`LocalBatch`, tokens
    flattened). On its first forward, if ``cfg.init_from_data``, ``molt`` is first rescaled to
    that batch (``train.init_from_data``), so a fresh MOLT never sees inputs at the wrong scale.
    """

    def __init__(self, mlp: nn.Module, molt: MOLT, cfg: TrainConfig, needs_init: bool) -> None:
        super().__init__()
        self.mlp = mlp
        self.molt = molt
        # out_weight is set from each batch's MLP outputs: the target moves during training.
        self.objective = LayerObjective(molt, torch.ones(()), cfg.sparsity_form, cfg.sparsity_c)
        self.standardize = cfg.standardize_outputs
        self.mix = 1.0
        self.sparsity_coef = 0.0
        self.consistency_weight = 0.0
        self.needs_init = needs_init
        self.last: LocalBatch | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x)
        cfg = self.molt.cfg
        if x.shape[-1] != cfg.d_in or y.shape[-1] != cfg.d_out:
            raise ValueError(
                f"MOLT maps {cfg.d_in} -> {cfg.d_out} features, but the MLP it stands in for "
                f"maps {x.shape[-1]} -> {y.shape[-1]}"
            )
        x_local = x.detach().reshape(-1, x.shape[-1])
        y_local = y.detach().reshape(-1, y.shape[-1])
        if self.needs_init:
            init_from_data(self.molt, x_local, y_local)
            self.needs_init = False
        self.objective.out_weight = output_weights(y_local, self.standardize)
        loss, pred, gates, indices = self.objective(x_local, y_local, cfg.k, self.sparsity_coef)
        consistency = None
        if self.consistency_weight > 0:
            # The MLP again on its detached input: the pull moves its parameters only.
            own = self.mlp(x.detach()).reshape(y_local.shape).float()
            error = (own - pred.detach().float()).square() * self.objective.out_weight
            consistency = self.consistency_weight * error.mean()
        self.last = LocalBatch(x_local, y_local, loss, pred, gates, indices, consistency)
        value = pred.detach().reshape(y.shape)
        if self.mix != 1.0:
            value = self.mix * value + (1.0 - self.mix) * y.detach()
        return value + (y - y.detach())


class ReplacementAware:
    """Replacement-aware training of ``model`` with one MOLT per MLP path.

    Args:
        model: the model; its MLPs at ``molts``' paths stay the trained ("master") modules.
        molts: ``{mlp path: MOLT}``; each MOLT maps the MLP's input width to its output width.
        schedule: the mixing weight of the replacement by step.
        molt_train: the MOLTs' optimisation (``lr``, ``weight_decay``, warm-ups, sparsity,
            ``init_from_data``, ``revive_every``, ``dead_window_tokens``, ``log_every``);
            ``steps`` is the length of the run (it sets the default sparsity warm-up);
            ``batch_size`` and the checkpoint fields are unused (a batch is the model's).
        sample: draw each layer's replacement per step (probability = the weight) instead of
            blending (module docstring).
        consistency: weight of the MLP-to-MOLT consistency term (module docstring); 0: none.

    Attributes:
        logs: ``{path: TrainLog}`` of each MOLT's local loss, batch FVU, L0 and dead fraction.
    """

    def __init__(
        self,
        model: nn.Module,
        molts: Mapping[str, MOLT],
        schedule: PhaseIn | None = None,
        molt_train: TrainConfig | None = None,
        sample: bool = False,
        consistency: float = 0.0,
    ) -> None:
        if not molts:
            raise ValueError("molts must name at least one MLP path")
        for path, molt in molts.items():
            if not isinstance(molt, MOLT):
                raise TypeError(f"molts[{path!r}] must be a MOLT, got {type(molt).__name__}")
            get_module(model, path)  # a bad path fails here, naming it
        if consistency < 0:
            raise ValueError(f"consistency must be >= 0, got {consistency!r}")
        self.model = model
        self.molts = dict(molts)
        self.schedule = schedule or PhaseIn()
        self.cfg = molt_train or TrainConfig()
        self.sample, self.consistency = sample, consistency
        # Draws of the sampled replacement: seeded, and apart from the global generator.
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        params = [p for molt in self.molts.values() for p in molt.parameters()]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.trackers = {
            path: DeadTracker(molt.cfg.n_transforms, self.cfg.dead_window_tokens)
            for path, molt in self.molts.items()
        }
        self.logs = {path: TrainLog() for path in self.molts}
        self.step = 0
        self.wrappers: dict[str, StraightThroughMOLT] = {}
        self._loss_taken = False

    @contextmanager
    def installed(self) -> Iterator[nn.Module]:
        """Swap every MLP for its :class:`StraightThroughMOLT` (MLPs restored on exit)."""
        needs_init = self.cfg.init_from_data and self.step == 0
        self.wrappers = {
            path: StraightThroughMOLT(get_module(self.model, path), molt, self.cfg, needs_init)
            for path, molt in self.molts.items()
        }
        try:
            with replaced(self.model, self.wrappers) as model:
                yield model
        finally:
            self.wrappers = {}

    def mix(self) -> float:
        """The replacement's mixing weight at the current step (with ``sample``: the
        probability that a layer runs its MOLT)."""
        return self.schedule.weight(self.step)

    def begin_step(self, step: int) -> None:
        """Set the step (from 1), its mixing weight (or each layer's draw), sparsity coefficient
        and MOLT learning rate (linear warm-ups as in ``train.train``)."""
        if not self.wrappers:
            raise RuntimeError("begin_step needs the trainer installed (with trainer.installed())")
        cfg = self.cfg
        self.step = step
        warmup = cfg.sparsity_warmup_steps
        warmup = max(1, cfg.steps // 5) if warmup is None else warmup
        weight = self.mix()
        for wrapper in self.wrappers.values():
            if self.sample:
                wrapper.mix = float(torch.rand((), generator=self.generator).item() < weight)
            else:
                wrapper.mix = weight
            wrapper.consistency_weight = self.consistency * weight
            wrapper.sparsity_coef = cfg.sparsity_coef * linear_warmup(step, warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step - 1, cfg.steps, cfg.lr_warmup_steps, "constant")

    def local_loss(self) -> Tensor:
        """Sum of every MOLT's local objective on the last forward (a 0-d tensor whose graph
        reaches the MOLTs' parameters only)."""
        losses = []
        for path, wrapper in self.wrappers.items():
            if wrapper.last is None:
                raise RuntimeError(f"no forward through {path!r} since the last update")
            losses.append(wrapper.last.loss)
        self._loss_taken = True
        return torch.stack(losses).sum()

    def consistency_loss(self) -> Tensor:
        """Sum of every layer's consistency term on the last forward (0-d; its graph reaches the
        MLPs' parameters only); zero when the weight or the schedule's weight is 0."""
        terms = [w.last.consistency for w in self.wrappers.values() if w.last is not None]
        terms = [t for t in terms if t is not None]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def end_step(self) -> None:
        """After ``backward``: step the MOLTs' optimizer, reopen dead gates, log, clear grads."""
        if not self._loss_taken:
            raise RuntimeError("end_step needs local_loss() (and its backward) first")
        cfg = self.cfg
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
        for path, wrapper in self.wrappers.items():
            batch = wrapper.last
            tracker = self.trackers[path]
            tracker.update(batch.gates.detach(), batch.indices)
            dead = tracker.dead_mask()
            window_full = tracker.tokens_seen >= tracker.window
            if cfg.revive_every and self.step % cfg.revive_every == 0 and window_full:
                reopen_dead(wrapper.molt, batch.x, dead.to(batch.x.device))
            if log_now:
                self.logs[path].record(
                    self.step, batch.loss, batch.pred, batch.y, batch.gates, dead
                )
            wrapper.last = None
        self._loss_taken = False
