"""Fit a MOLT or a TopK transcoder to (mlp_in, mlp_out) pairs.

Loss: MSE on standardised outputs (each output dim weighted by 1 / its variance, so the loss reads
as a fraction of variance and a few high-variance dims don't dominate), plus for MOLTs the
Frobenius-scaled sparsity penalty (tanh or L1) with its coefficient warmed up linearly from 0.
TopK transcoders are sparse by their top-k.

Collapse guard. On real activations a gated MOLT can collapse: the sparsity penalty closes gates
faster than reconstruction opens them, ending at L0 ~ 1 or with every gate dead; and any transform
that stops firing gets no gradient and never comes back. Three remedies, all on by default:
  1. data-aware init (:func:`init_from_data`): gate and V weights rescaled to the inputs' scale,
     and each gate bias set from a data quantile so every transform fires on about init_l0 / T of
     the tokens at step 0 (no transform starts dead, whatever the input scale);
  2. sparsity warm-up: the penalty's coefficient rises linearly over ``sparsity_warmup_steps``, so
     the reconstruction is learnt before sparsity is pushed;
  3. dead-gate reopening: every ``revive_every`` steps, each transform that has not fired in the
     last ``dead_window_tokens`` tokens gets its gate bias re-fit to the current batch so that it
     fires on about init_l0 / T of the tokens again. A closed relu/jumprelu gate has no gradient,
     so nothing else can reopen it (an AuxK-style loss does not: it fits the residual with
     negative gates and leaves the pre-activations below zero — we measured that on MiniLM).
     TopK transcoders get the same reopening (:func:`fit_encoder_bias`): a dead feature's encoder
     bias is re-fit so that it enters the top k on about k / F of the batch's tokens. Without it,
     a matched transcoder on MiniLM layer 3 (F=1294, k=4, 800 steps) ended with 23% of its
     features dead in the last 50k tokens, and 33% silent on held-out text.
``tests/test_train.py`` shows the failure without them and its absence with them on real MiniLM
activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers.molt import MOLT
from ..layers.transcoder import TopKTranscoder
from ..ops.validation import check_positive_float
from .metrics import DeadTracker, fvu, l0

PENALTY_FORMS = ("tanh", "l1")


@dataclass
class TrainConfig:
    """Optimisation settings; defaults suit a few thousand steps on MLP activations."""

    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup_steps: int = 50
    sparsity_coef: float = 3e-3
    sparsity_form: str = "tanh"
    sparsity_c: float = 1.0
    sparsity_warmup_steps: int | None = None  # None: a fifth of the steps
    standardize_outputs: bool = True
    init_from_data: bool = True
    revive_every: int | None = 100  # steps between dead-gate reopenings; None: never
    dead_window_tokens: int = 50_000
    log_every: int = 50
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.sparsity_form not in PENALTY_FORMS:
            raise ValueError(
                f"sparsity_form must be one of {PENALTY_FORMS}, got {self.sparsity_form!r}"
            )
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_positive_float("lr", self.lr)
        for name in ("weight_decay", "sparsity_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")


@dataclass
class TrainLog:
    """Metrics every ``log_every`` steps: lists aligned with ``step``."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(
        self, step: int, loss: Tensor, pred: Tensor, target: Tensor, gates: Tensor, dead: Tensor
    ) -> None:
        """Append one step: its loss, the FVU of pred vs target [n, d_out], the L0 of gates
        [n, k] and the dead fraction of the [n_units] bool mask."""
        self.step.append(step)
        self.loss.append(loss.item())
        self.fvu.append(fvu(pred.detach(), target).item())
        self.l0.append(l0(gates.detach()).item())
        self.dead_fraction.append(dead.double().mean().item())

    def last(self) -> dict[str, float]:
        keys = ("step", "loss", "fvu", "l0", "dead_fraction")
        return {k: getattr(self, k)[-1] for k in keys} if self.step else {}


def _n_units(layer: nn.Module) -> int:
    return layer.cfg.n_transforms if isinstance(layer, MOLT) else layer.cfg.n_features


@torch.no_grad()
def init_from_data(layer: nn.Module, x: Tensor, y: Tensor) -> None:
    """Rescale a freshly initialised layer to data x [n, d_in], y [n, d_out].

    MOLT: W_gate and V are divided by the inputs' RMS (their init assumes unit-variance inputs);
    each gate bias is set so that its transform fires on about init_l0 / T of these tokens; U is
    scaled to the outputs' spread and b_dec (if any) set to their mean. With
    ``cfg.standardize`` the standardisation statistics are set from x and y first (per-dimension
    mean and std), and the rest is fitted in the standardised space. Transcoder: W_enc rescaled,
    b_dec set to the outputs' mean and W_dec zeroed (its output starts at the mean).
    """
    dtype = next(layer.parameters()).dtype
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    y = y.reshape(-1, y.shape[-1]).to(dtype)
    raw_x = x
    if isinstance(layer, MOLT) and layer.cfg.standardize:
        for side, t in (("input", x), ("output", y)):
            getattr(layer, f"{side}_mean").copy_(t.mean(0))
            getattr(layer, f"{side}_std").copy_(t.std(0).clamp_min(1e-8))
        x = layer.standardize_input(x)
        y = (y - layer.output_mean) / layer.output_std
    x_rms = x.square().mean().sqrt().clamp_min(1e-12)
    y_spread = (y - y.mean(0)).square().mean().sqrt().clamp_min(1e-12)
    if layer.b_dec is not None:
        layer.b_dec.copy_(y.mean(0))
    if not isinstance(layer, MOLT):
        layer.W_enc.div_(x_rms)
        # A transcoder's decoder starts at zero (as sparsify does): output = b_dec = the mean.
        # A random decoder adds noise of size ~sqrt(k) to every output, and at large k the
        # encoder learns to silence features to cancel it before it learns to reconstruct (on
        # MiniLM layer 3, k=64 of 1294, 300 steps: 25 of 64 activations positive, held-out FVU
        # 0.31 tied, 0.15 zero).
        layer.W_dec.zero_()
        return
    layer.W_gate.div_(x_rms)
    for u, v in zip(layer.U, layer.V):
        v.div_(x_rms)
        u.mul_(y_spread)
    fit_gate_bias(layer, raw_x)


@torch.no_grad()
def fit_gate_bias(layer: MOLT, x: Tensor, which: Tensor | None = None) -> None:
    """Set the gate bias of transforms ``which`` ([T] bool; all if None) so that each fires on
    about init_l0 / T of the tokens x [n, d_in] (raw: standardised here if the layer is). No-op
    for identity gates."""
    cfg = layer.cfg
    fire_rate = cfg.expected_l0_at_init / cfg.n_transforms
    if cfg.activation == "identity" or fire_rate >= 1.0:
        return
    pre = layer.standardize_input(x.to(layer.W_gate.dtype)) @ layer.W_gate.T  # [n, T], no bias
    cut = quantile_rows(pre, 1.0 - fire_rate)
    # relu fires when pre + b > 0; jumprelu when pre + b > theta, or n_t (pre + b) > theta with
    # a norm-scaled gate.
    if cfg.activation == "relu":
        opening = -cut
    else:
        theta = layer.log_threshold.exp()
        if cfg.scale_gate_by_norm:
            norms = layer.gate_norm_scale()
            theta = torch.where(norms > 0, theta / norms, theta)
        opening = theta - cut
    if which is None:
        layer.b_gate.copy_(opening)
    else:
        layer.b_gate.copy_(torch.where(which, opening, layer.b_gate))


@torch.no_grad()
def fit_encoder_bias(layer: TopKTranscoder, x: Tensor, which: Tensor) -> None:
    """Set the encoder bias of the features ``which`` ([F] bool) of a TopK transcoder so that each
    enters the top k, with a positive activation, on about k / F of the tokens x [n, d_in].

    A feature enters a token's top k when its pre-activation beats the token's k-th largest one
    (and zero, for the relu): the bias moves each chosen feature's margin over that bar to its
    (1 - k/F) quantile over the tokens. The other features' biases are unchanged.
    """
    cfg = layer.cfg
    pre = x.to(layer.W_enc.dtype) @ layer.W_enc.T + layer.b_enc  # [n, F]
    bar = pre.topk(cfg.k, dim=-1).values[:, -1:].clamp_min(0)  # [n, 1]
    margin = quantile_rows(pre - bar, 1.0 - cfg.k / cfg.n_features)  # [F]
    layer.b_enc.copy_(torch.where(which, layer.b_enc - margin, layer.b_enc))


def quantile_rows(values: Tensor, q: float) -> Tensor:
    """The q-quantile of each column of values [n, m] -> [m] (torch.quantile, in fp32)."""
    return torch.quantile(values.float(), q, dim=0).to(values.dtype)


def reopen_dead(layer: nn.Module, x: Tensor, dead: Tensor) -> None:
    """Reopen the dead units ([n_units] bool) of a MOLT or TopK transcoder on the batch x."""
    if not dead.any():
        return
    if isinstance(layer, MOLT):
        fit_gate_bias(layer, x, dead)
    else:
        fit_encoder_bias(layer, x, dead)


def _batches(x: Tensor, y: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[tuple]:
    """Endless shuffled mini-batches of in-memory pairs."""
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = perm[lo : lo + batch_size]
            yield x[idx], y[idx]


def train(
    layer: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig | None = None,
) -> TrainLog:
    """Fit ``layer`` (a MOLT or a TopKTranscoder) to pairs x [n, d_in] -> y [n, d_out] in place.

    Returns the metric log. Checkpoints (``save_pretrained``) go to ``cfg.checkpoint_dir/step_N``.
    """
    cfg = cfg or TrainConfig()
    for name, t, width in (("x", x, layer.cfg.d_in), ("y", y, layer.cfg.d_out)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != width:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-d tensor [n, {width}] for this layer, got {got}")
    if x.shape[0] != y.shape[0] or x.shape[0] < cfg.batch_size:
        raise ValueError(
            f"x and y need the same number of rows, at least batch_size={cfg.batch_size}; "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    is_molt = isinstance(layer, MOLT)
    first = next(layer.parameters())
    dtype, device = first.dtype, first.device
    x, y = x.to(device, dtype), y.to(device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init_from_data:
        sample = torch.randperm(x.shape[0], generator=gen)[: min(x.shape[0], 16 * cfg.batch_size)]
        init_from_data(layer, x[sample], y[sample])
    out_weight = (
        1.0 / y.var(0).clamp_min(1e-12) if cfg.standardize_outputs else torch.ones_like(y[0])
    )
    out_weight = out_weight / out_weight.mean()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.sparsity_warmup_steps
    warmup = max(1, cfg.steps // 5) if warmup is None else warmup
    tracker = DeadTracker(_n_units(layer), cfg.dead_window_tokens)
    log = TrainLog()
    batches = _batches(x, y, cfg.batch_size, gen)
    progress = _progress(cfg.steps, cfg.progress)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        xb, yb = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.lr_warmup_steps))
        gates, indices = layer.encode(xb)
        pred = layer.decode(xb, gates, indices)
        loss = ((pred - yb).square() * out_weight).mean()
        if is_molt and cfg.sparsity_coef > 0:
            coef = cfg.sparsity_coef * min(1.0, step / warmup)
            loss = loss + coef * layer.sparsity_penalty(
                gates, indices, cfg.sparsity_form, cfg.sparsity_c
            )
        tracker.update(gates.detach(), indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dead = tracker.dead_mask()
        window_full = tracker.tokens_seen >= tracker.window
        if cfg.revive_every and step % cfg.revive_every == 0 and window_full:
            reopen_dead(layer, xb, dead.to(device))
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.record(step, loss, pred, yb, gates, dead)
            progress.set_postfix(
                fvu=f"{log.fvu[-1]:.3f}",
                l0=f"{log.l0[-1]:.1f}",
                dead=f"{log.dead_fraction[-1]:.2f}",
            )
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            layer.save_pretrained(Path(cfg.checkpoint_dir) / f"step_{step}")
        progress.update(1)
    progress.close()
    log.seconds = time.perf_counter() - start
    return log


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar on a terminal only, so logs stay readable.
    return tqdm(total=total, disable=None if enabled else True, desc="train", leave=False)
