"""``python -m molt_kernels study replacement-aware [--quick] --out DIR``: does training a model
through its MLPs' MOLT replacements (:mod:`molt_kernels.interp.replacement_aware`) leave it more
replaceable than fitting MOLTs afterwards?

A small GPT (:mod:`molt_kernels.interp.models.gpt`) is trained from scratch on CPython's pydoc
topics (:mod:`molt_kernels.interp.lm_data`), with one MOLT per MLP, in three arms:

- (a) ``posthoc``: pretrain normally for ``steps`` steps, then fit each MOLT to its MLP for
  ``steps`` updates of ``batch * context`` tokens of captured training activations;
- (b) ``aware``: replacement-aware pretraining from scratch for ``steps`` steps (same initial
  weights and batches as (a)); every MOLT gets one update of the same size per step, so (a) and
  (b) spend the same LM steps, the same MOLT updates and the same MOLT size and sparsity penalty;
- (c) ``aware_finetune``: (a)'s model and MOLTs, then ``finetune_steps`` replacement-aware steps
  (more compute than (a): reported as such) on the fine-tune's own schedule, the ``finetune_``
  fields (by default each layer runs its MOLT on about half the late steps, its MLP on the
  others); ``finetune_variants`` repeat it with other fine-tune settings (``FINETUNE_FIELDS``)
  from the same (a).

Every MOLT's local objective is the variance-weighted MSE plus ``sparsity_coef`` times the
norm-scaled tanh penalty; the top-k (``molt_k``) holds L0 at k in every arm, so the penalty
shapes which transforms fire and how large they are, not how many. Dropout, when set, is the
same in every arm and off whenever anything is evaluated or captured.

The held-out text is cut into two halves with no text in common: training curves are on the
validation half (so is ``comparison[arm]["validation"]``, which a choice between settings may
use), the final numbers on the test half. For each arm, on the test half: the model's own
cross-entropy, with each MLP spliced alone and with all spliced at once (``replace.replaced``),
their gaps over its own CE, and per MOLT the FVU, L0, dead fraction (never firing on test
tokens) and the mean cosine of its closed-form Jacobian with the MLP's; over training, the LM
loss and each MOLT's FVU, L0 and dead fraction. gap_closed = (gap_a - gap_x) / gap_a with
gap = CE(all spliced) - CE(own); since an aware model's own CE may itself rise,
gap_closed_vs_posthoc_own uses CE_a(own) as the reference for both. Writes
``DIR/replacement_aware.json`` and ``DIR/replacement_aware.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...interp.activations import Hookpoints
from ...interp.lm_data import (
    SEP_ID,
    TokenCorpus,
    load_pydoc_corpus,
    random_windows,
    tiled_windows,
)
from ...interp.metrics import (
    DeadTracker,
    fvu,
    jacobian_cosine,
    l0,
    module_jacobian,
    molt_jacobian,
)
from ...interp.models.gpt import GPT, GPTConfig, gpt_mlp_path
from ...interp.replace import get_module, replaced
from ...interp.replacement_aware import PhaseIn, ReplacementAware
from ...interp.schedules import lr_factor
from ...interp.train import TrainConfig, TrainLog, train
from ...layers.config import MOLTConfig, paper_rank_counts
from ...layers.molt import MOLT

SCHEMA = "molt_kernels.study.replacement_aware/2"
ARMS = ("posthoc", "aware", "aware_finetune")
GOAL_GAP_CLOSED = 0.55
GOAL_OWN_CE_INCREASE = 0.02


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines one run of the study (stored in the JSON)."""

    # the language model
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    dropout: float = 0.0  # GPT-2's places; the same in every arm
    context: int = 64
    batch: int = 16
    steps: int = 800
    lr: float = 3e-3
    lr_warmup_steps: int = 50
    weight_decay: float = 0.1
    # the MOLTs: paper allocation (n x max_rank, 2n x max_rank/2, ...) over n_buckets, top-k
    molt_n: int = 1
    molt_max_rank: int = 16
    molt_buckets: int = 4
    molt_k: int = 2
    molt_lr: float = 3e-3
    # train.TrainConfig's default tanh penalty (about 1-2% of a well-fitted MOLT's local loss);
    # the top-k still holds L0 at k, so every arm has the same L0.
    sparsity_coef: float = 3e-3
    dead_window_tokens: int = 16384
    # (b)'s replacement-aware schedule: mixing weight 0 until start, then a linear ramp to final
    phase_in_start: float = 0.1  # fractions of steps
    phase_in_ramp: float = 0.3
    phase_in_final: float = 1.0  # the mixing weight at the end of the ramp
    sample_replacement: bool = False  # draw MOLT-or-MLP per layer and step (ReplacementAware)
    consistency: float = 0.0  # weight of the MLP-to-MOLT consistency term (ReplacementAware)
    # the fine-tune (c) of (a): its length, lr and its own schedule (fractions of finetune_steps).
    # Sampled, final 0.5: each layer runs its MOLT on about half the late steps and its MLP on the
    # others. Chosen over the plain blend to 1.0 by the rule written down before any variant ran
    # (bench/RESULTS.md: highest 3-seed mean validation gap closed among the settings whose
    # validation own CE rises at most 2%).
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    finetune_phase_in_start: float = 0.1
    finetune_phase_in_ramp: float = 0.3
    finetune_phase_in_final: float = 0.5
    finetune_sample_replacement: bool = True
    finetune_consistency: float = 0.0
    # measurement
    log_every: int = 25
    eval_every: int = 100
    capture_tokens: int = 65536
    heldout_tokens: int = 0  # evaluate on the first this many tokens of each half; 0: all
    jacobian_tokens: int = 128
    seed: int = 0

    def gpt(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            context=self.context,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            dropout=self.dropout,
        )

    def molt(self) -> MOLTConfig:
        ranks = paper_rank_counts(self.molt_n, self.molt_max_rank, self.molt_buckets)
        return MOLTConfig(d_in=self.d_model, rank_counts=ranks, k=self.molt_k)

    def molt_train(self, steps: int, **overrides: Any) -> TrainConfig:
        """The MOLTs' optimisation, shared by the post-hoc fit and the aware arms."""
        settings = dict(
            steps=steps,
            batch_size=self.batch * self.context,
            lr=self.molt_lr,
            sparsity_coef=self.sparsity_coef,
            dead_window_tokens=self.dead_window_tokens,
            log_every=self.log_every,
            seed=self.seed,
            progress=False,
        )
        return TrainConfig(**{**settings, **overrides})

    @property
    def mlp_paths(self) -> list[str]:
        return [gpt_mlp_path(i) for i in range(self.n_layers)]


# What a fine-tune variant may change: everything else defines (a), which the variants share.
FINETUNE_FIELDS = frozenset(
    name for name in StudyConfig.__dataclass_fields__ if name.startswith("finetune_")
)

QUICK = StudyConfig()
# The full run doubles the LM steps and adds dropout (in every arm): sized so that the baseline's
# validation CE is flat at its end, not past its minimum (bench/RESULTS.md: 3000 steps without
# dropout over-trained it on the 97k training tokens).
FULL = replace(QUICK, steps=1600, dropout=0.1, finetune_steps=400, log_every=50)


@dataclass
class Curves:
    """Per-arm training curves: LM loss by step, held-out CE by step, MOLT logs by path."""

    step: list[int] = field(default_factory=list)
    train_ce: list[float] = field(default_factory=list)  # mean since the previous point
    mix: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    validation_ce_own: list[float] = field(default_factory=list)
    validation_ce_all_spliced: list[float | None] = field(default_factory=list)
    molt: dict[str, TrainLog] = field(default_factory=dict)


# -- training --------------------------------------------------------------------------------


def split_heldout(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The held-out stream [n] cut after the [SEP] (id 1) nearest its middle: (validation, test),
    two halves with no text in common."""
    ends = (tokens == SEP_ID).nonzero().flatten()
    if len(ends) < 2:
        raise ValueError(f"the held-out stream needs at least 2 texts, got {len(ends)}")
    cut = int(ends[(ends - tokens.numel() // 2).abs().argmin().clamp_max(len(ends) - 2)]) + 1
    return tokens[:cut], tokens[cut:]


def heldout_windows(corpus: TokenCorpus, cfg: StudyConfig) -> tuple[Tensor, Tensor]:
    """The (validation, test) windows [n, context + 1] int64: training curves (and any choice
    between variants) use the validation half, the final report the test half."""
    halves = split_heldout(corpus.heldout)
    return tuple(tiled_windows(h[: cfg.heldout_tokens or None], cfg.context + 1) for h in halves)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout), its previous mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def heldout_ce(
    model: GPT, windows: Tensor, swap: Mapping[str, nn.Module] | None = None, batch: int = 64
) -> float:
    """Mean next-token CE (nats) over windows [n, T + 1] in eval mode, with ``swap``
    ({path: module}) installed in place of the modules there."""
    with evaluating(model), replaced(model, swap or {}):
        total = sum(model.loss(w).item() * len(w) for w in windows.split(batch))
    return total / len(windows)


def train_lm(
    model: GPT,
    corpus: TokenCorpus,
    cfg: StudyConfig,
    steps: int,
    peak_lr: float,
    label: str,
    curves: Curves,
    aware: ReplacementAware | None = None,
    progress: bool = True,
) -> None:
    """Train ``model`` for ``steps`` steps (replacement-aware if ``aware`` is given), appending
    to ``curves``; batches come from a generator seeded with ``cfg.seed``, so arms that start
    from the same weights see the same batches."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(  # before installing: the MOLTs' parameters are not ours
        model.parameters(), lr=peak_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    params = list(model.parameters())
    validation, _ = heldout_windows(corpus, cfg)
    model.train()
    bar = tqdm(total=steps, desc=label, disable=not progress, mininterval=10, ascii=True)
    interval: list[float] = []  # LM losses since the last log point
    with aware.installed() if aware is not None else nullcontext():
        for step in range(1, steps + 1):
            for group in optimizer.param_groups:
                # Linear warm-up, then cosine decay to a tenth of the peak.
                decay = lr_factor(step - 1, steps, cfg.lr_warmup_steps, "cosine", 0.1)
                group["lr"] = peak_lr * decay
            tokens = random_windows(corpus.train, cfg.batch, cfg.context + 1, gen)
            if aware is not None:
                aware.begin_step(step)
            lm_loss = model.loss(tokens)
            loss = lm_loss
            if aware is not None:
                loss = loss + aware.local_loss() + aware.consistency_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if aware is not None:
                aware.end_step()
            interval.append(lm_loss.item())
            if step % cfg.log_every == 0 or step == steps:
                curves.step.append(step)
                curves.train_ce.append(sum(interval) / len(interval))
                curves.mix.append(aware.mix() if aware is not None else 0.0)
                bar.set_postfix(ce=f"{curves.train_ce[-1]:.3f}", refresh=False)
                interval = []
            if step % cfg.eval_every == 0 or step == steps:
                _eval_point(model, validation, curves, step, aware)
            bar.update(1)
    bar.close()


def _eval_point(
    model: GPT, validation: Tensor, curves: Curves, step: int, aware: ReplacementAware | None
) -> None:
    """Validation CE with the MLPs, and (aware runs) with every MOLT spliced, at this step."""
    curves.eval_step.append(step)
    if aware is None:
        curves.validation_ce_own.append(heldout_ce(model, validation))
        curves.validation_ce_all_spliced.append(None)  # no MOLTs during plain pretraining
        return
    mlps = {path: wrapper.mlp for path, wrapper in aware.wrappers.items()}
    curves.validation_ce_own.append(heldout_ce(model, validation, mlps))
    curves.validation_ce_all_spliced.append(heldout_ce(model, validation, aware.molts))


@torch.no_grad()
def capture_mlp_pairs(
    model: nn.Module, paths: Sequence[str], windows: Tensor, max_tokens: int, batch: int = 64
) -> dict[str, tuple[Tensor, Tensor]]:
    """(input [n, d], output [n, d]) of every MLP at ``paths`` over the inputs of ``windows``
    [m, T + 1], all layers from one forward per batch; n = min(max_tokens, m * T)."""
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {path: [] for path in paths}
    seen = 0
    for w in windows.split(batch):
        if seen >= max_tokens:
            break
        with evaluating(model), Hookpoints(model, paths) as hooks:
            model(w[:, :-1])
        for path, (x, y) in hooks.records.items():
            parts[path].append((x.flatten(0, -2), y.flatten(0, -2)))
        seen += w[:, :-1].numel()
    return {
        path: tuple(torch.cat(side)[:max_tokens] for side in zip(*pairs, strict=True))
        for path, pairs in parts.items()
    }


def fit_molts_posthoc(
    model: GPT, corpus: TokenCorpus, cfg: StudyConfig, curves: Curves, progress: bool = True
) -> dict[str, MOLT]:
    """Arm (a)'s second half: one MOLT per MLP fitted to captured training activations."""
    windows = tiled_windows(corpus.train, cfg.context + 1)
    pairs = capture_mlp_pairs(model, cfg.mlp_paths, windows, cfg.capture_tokens)
    molts = {}
    for path, (x, y) in pairs.items():
        start = time.perf_counter()
        molt = MOLT(cfg.molt())
        curves.molt[path] = train(molt, x, y, cfg.molt_train(cfg.steps))
        molts[path] = molt
        if progress:
            last = curves.molt[path].last()
            print(
                f"(a) fit {path}: {len(x)} tokens, fvu {last['fvu']:.3f}, l0 {last['l0']:.2f}, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
    return molts


# -- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def molt_metrics(molt: MOLT, mlp: nn.Module, x: Tensor, y: Tensor, n_jacobian: int) -> dict:
    """Held-out FVU, L0 and dead fraction of ``molt`` against the MLP pairs x -> y [n, d], the
    gates that are open before the top-k cut (their L0 without top-k: a MOLT whose inputs drift
    into superposition needs more), and the mean cosine of its Jacobian with the MLP's on the
    first ``n_jacobian`` tokens."""
    gates, indices = molt.encode(x)
    pred = molt.decode(x, gates, indices)
    all_gates, _ = molt.encode(x, k=None)
    never_fired = DeadTracker(molt.cfg.n_transforms, window=len(x))
    never_fired.update(gates, indices)
    xj = x[:n_jacobian]
    with torch.enable_grad():
        mlp_jacobian = module_jacobian(mlp, xj)
    cosine = jacobian_cosine(molt_jacobian(molt, xj), mlp_jacobian)
    return {
        "fvu": fvu(pred, y).item(),
        "l0": l0(gates).item(),
        "open_gates": l0(all_gates).item(),
        "dead_fraction": never_fired.dead_fraction(),
        "jacobian_cosine": cosine.mean().item(),
    }


def evaluate_arm(
    model: GPT, molts: Mapping[str, MOLT], corpus: TokenCorpus, cfg: StudyConfig
) -> tuple[dict[str, Any], dict[str, float]]:
    """(test, validation): on the test half, CE (own, each MLP spliced alone, all spliced) and
    per-MOLT metrics; on the validation half, CE own and all spliced and their gap."""
    validation, windows = heldout_windows(corpus, cfg)
    own_validation = heldout_ce(model, validation)
    all_validation = heldout_ce(model, validation, molts)
    checked = {
        "ce_own": own_validation,
        "ce_spliced_all": all_validation,
        "gap_all": all_validation - own_validation,
    }
    own = heldout_ce(model, windows)
    one = {path: heldout_ce(model, windows, {path: molt}) for path, molt in molts.items()}
    every = heldout_ce(model, windows, molts)
    pairs = capture_mlp_pairs(model, list(molts), windows, cfg.capture_tokens)
    per_molt = {
        path: molt_metrics(molt, get_module(model, path), *pairs[path], cfg.jacobian_tokens)
        for path, molt in molts.items()
    }
    one_mean = sum(one.values()) / len(one)
    test = {
        "ce_own": own,
        "ce_spliced_one": one,
        "ce_spliced_one_mean": one_mean,
        "ce_spliced_all": every,
        "gap_one_mean": one_mean - own,
        "gap_all": every - own,
        "molts": per_molt,
    }
    return test, checked


def _closed(gap_baseline: float, gap_arm: float) -> float | None:
    """(gap_baseline - gap_arm) / gap_baseline; None when there is no gap to close."""
    return (gap_baseline - gap_arm) / gap_baseline if gap_baseline > 0 else None


def goal_check(baseline: Mapping[str, Any], arm: Mapping[str, Any]) -> dict[str, Any]:
    """The all-layer gap closed by ``arm`` over the post-hoc ``baseline``, its own CE's relative
    change, and whether both meet the goal (from dicts with ce_own and gap_all)."""
    gap_closed = _closed(baseline["gap_all"], arm["gap_all"])
    own_change = arm["ce_own"] / baseline["ce_own"] - 1.0
    return {
        "gap_closed_all": gap_closed,
        "own_ce_relative_change": own_change,
        "goal_met": gap_closed is not None
        and gap_closed >= GOAL_GAP_CLOSED
        and own_change <= GOAL_OWN_CE_INCREASE,
    }


def compare(baseline: Mapping[str, Any], arm: Mapping[str, Any]) -> dict[str, Any]:
    """``arm``'s results against the post-hoc ``baseline`` (both from :func:`_arm_result`): on
    the test half the goal check and the one-layer and "from a's own CE" gap-closed fractions;
    on the validation half the goal check alone (what a choice between variants may use)."""
    test_a, test_x = baseline["test"], arm["test"]
    spliced_vs_a_own = test_x["ce_spliced_all"] - test_a["ce_own"]
    return {
        **goal_check(test_a, test_x),
        "gap_closed_one_mean": _closed(test_a["gap_one_mean"], test_x["gap_one_mean"]),
        "gap_closed_all_vs_posthoc_own": _closed(test_a["gap_all"], spliced_vs_a_own),
        "validation": goal_check(baseline["validation"], arm["validation"]),
    }


# -- the study -------------------------------------------------------------------------------


def _arm_result(
    description: str,
    compute: dict,
    seconds: float,
    evaluated: tuple[dict[str, Any], dict[str, float]],
    curves: Curves,
) -> dict[str, Any]:
    curve_dict = asdict(curves)
    curve_dict["molt"] = {path: asdict(log) for path, log in curves.molt.items()}
    test, validation = evaluated
    return {
        "description": description,
        "compute": compute,
        "seconds": seconds,
        "test": test,
        "validation": validation,
        "curves": curve_dict,
    }


def posthoc_arm(
    cfg: StudyConfig, corpus: TokenCorpus, progress: bool
) -> tuple[dict[str, Any], GPT, dict[str, MOLT]]:
    """(a): pretrain normally, then fit the MOLTs. Returns the result, the model and MOLTs."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt(len(corpus.vocab)))
    curves = Curves()
    train_lm(model, corpus, cfg, cfg.steps, cfg.lr, "(a) pretrain", curves, None, progress)
    torch.manual_seed(cfg.seed + 1)
    molts = fit_molts_posthoc(model, corpus, cfg, curves, progress)
    result = _arm_result(
        "pretrain normally, then fit a MOLT to every MLP on captured training activations",
        _compute(cfg, cfg.steps),
        time.perf_counter() - start,
        evaluate_arm(model, molts, corpus, cfg),
        curves,
    )
    return result, model, molts


def aware_arm(cfg: StudyConfig, progress: bool, threads: int | None = None) -> dict[str, Any]:
    """(b): replacement-aware pretraining from scratch, with the same initial weights and
    batches as (a). Loads the corpus itself, so it can run in a worker process."""
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    corpus = load_pydoc_corpus(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt(len(corpus.vocab)))
    torch.manual_seed(cfg.seed + 1)
    molts = {path: MOLT(cfg.molt()) for path in cfg.mlp_paths}
    aware = _trainer(cfg, model, molts, cfg.steps, cfg.molt_train(cfg.steps), finetune=False)
    curves = Curves(molt=aware.logs)
    train_lm(model, corpus, cfg, cfg.steps, cfg.lr, "(b) aware", curves, aware, progress)
    return _arm_result(
        "replacement-aware pretraining from scratch (same init and batches as posthoc)",
        _compute(cfg, cfg.steps),
        time.perf_counter() - start,
        evaluate_arm(model, molts, corpus, cfg),
        curves,
    )


def finetune_arm(
    cfg: StudyConfig,
    corpus: TokenCorpus,
    posthoc: dict[str, Any],
    model: GPT,
    molts: Mapping[str, MOLT],
    progress: bool,
) -> dict[str, Any]:
    """(c): (a)'s model and MOLTs (copied), then a replacement-aware fine-tune; its compute and
    seconds include (a)'s."""
    start = time.perf_counter()
    model, molts = copy.deepcopy(model), copy.deepcopy(dict(molts))
    molt_train = cfg.molt_train(cfg.finetune_steps, init_from_data=False, sparsity_warmup_steps=1)
    aware = _trainer(cfg, model, molts, cfg.finetune_steps, molt_train, finetune=True)
    curves = Curves(molt=aware.logs)
    train_lm(
        model, corpus, cfg, cfg.finetune_steps, cfg.finetune_lr, "(c) fine-tune", curves,
        aware, progress,
    )  # fmt: skip
    return _arm_result(
        "posthoc's model and MOLTs, then a replacement-aware fine-tune (extra compute)",
        _compute(cfg, cfg.steps + cfg.finetune_steps),
        time.perf_counter() - start + posthoc["seconds"],
        evaluate_arm(model, molts, corpus, cfg),
        curves,
    )


def run_study(
    cfg: StudyConfig,
    progress: bool = True,
    jobs: int = 1,
    finetune_variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the three arms and return the JSON-ready report. With ``jobs`` >= 2, arm (b) runs in
    a second process (one torch thread each) while (a) and then (c) run here.

    ``finetune_variants`` ({name: {field: value}}, fields from ``FINETUNE_FIELDS``): after (c),
    one more fine-tune of (a)'s model and MOLTs per entry, with those fields overridden, under
    ``report["finetune_variants"][name]`` (a variant costs a fine-tune, not a whole study)."""
    variants = {name: dict(overrides) for name, overrides in (finetune_variants or {}).items()}
    for name, overrides in variants.items():
        unknown = set(overrides) - FINETUNE_FIELDS
        if unknown:
            raise ValueError(
                f"finetune variant {name!r} may set only {sorted(FINETUNE_FIELDS)}, got "
                f"{sorted(unknown)}"
            )
    start = time.perf_counter()
    load_before = os.getloadavg()
    corpus = load_pydoc_corpus(seed=cfg.seed)
    arms: dict[str, dict[str, Any]] = {}

    def finetunes(model_a: GPT, molts_a: Mapping[str, MOLT]) -> dict[str, dict[str, Any]]:
        settings = {"aware_finetune": cfg} | {
            name: replace(cfg, **overrides) for name, overrides in variants.items()
        }
        return {
            name: finetune_arm(c, corpus, arms["posthoc"], model_a, molts_a, progress)
            for name, c in settings.items()
        }

    if jobs >= 2:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            aware = pool.submit(aware_arm, cfg, progress, torch.get_num_threads())
            arms["posthoc"], model_a, molts_a = posthoc_arm(cfg, corpus, progress)
            finetuned = finetunes(model_a, molts_a)
            arms["aware"] = aware.result()
    else:
        arms["posthoc"], model_a, molts_a = posthoc_arm(cfg, corpus, progress)
        arms["aware"] = aware_arm(cfg, progress)
        finetuned = finetunes(model_a, molts_a)
    arms["aware_finetune"] = finetuned.pop("aware_finetune")
    validation, test = (w[:, 1:] for w in heldout_windows(corpus, cfg))

    return {
        "schema": SCHEMA,
        "config": asdict(cfg),
        "gpt": asdict(cfg.gpt(len(corpus.vocab))),
        "molt": cfg.molt().to_dict(),
        "data": {
            "train_tokens": corpus.train.numel(),
            "heldout_tokens": corpus.heldout.numel(),
            "validation_scored_tokens": validation.numel(),
            "test_scored_tokens": test.numel(),
            "vocab_size": len(corpus.vocab),
            "heldout_unk_fraction": corpus.heldout_unk_fraction,
            "n_train_texts": corpus.n_train_texts,
            "n_heldout_texts": corpus.n_heldout_texts,
        },
        "arms": arms,
        "comparison": {
            arm: compare(arms["posthoc"], arms[arm]) for arm in ("aware", "aware_finetune")
        },
        "finetune_variants": {
            name: {
                "overrides": variants[name],
                "arm": result,
                "comparison": compare(arms["posthoc"], result),
            }
            for name, result in finetuned.items()
        },
        "goal": {
            "gap_closed_all": GOAL_GAP_CLOSED,
            "own_ce_increase_at_most": GOAL_OWN_CE_INCREASE,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "jobs": jobs,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": time.perf_counter() - start,
        },
    }


def _compute(cfg: StudyConfig, steps: int) -> dict[str, int]:
    """LM steps and tokens, and per-layer MOLT updates and tokens, of an arm of ``steps`` steps
    (each MOLT update is one LM batch of tokens)."""
    tokens = steps * cfg.batch * cfg.context
    return {
        "lm_steps": steps,
        "lm_tokens": tokens,
        "molt_updates_per_layer": steps,
        "molt_tokens_per_layer": tokens,
    }


def _trainer(
    cfg: StudyConfig,
    model: GPT,
    molts: Mapping[str, MOLT],
    steps: int,
    molt_train: TrainConfig,
    finetune: bool,
) -> ReplacementAware:
    """The replacement-aware trainer of an aware arm of ``steps`` LM steps, on (b)'s schedule
    fields, or on the ``finetune_`` ones for the fine-tune (c)."""
    if finetune:
        start, ramp = cfg.finetune_phase_in_start, cfg.finetune_phase_in_ramp
        final, sample = cfg.finetune_phase_in_final, cfg.finetune_sample_replacement
        consistency = cfg.finetune_consistency
    else:
        start, ramp, final = cfg.phase_in_start, cfg.phase_in_ramp, cfg.phase_in_final
        sample, consistency = cfg.sample_replacement, cfg.consistency
    schedule = PhaseIn(round(start * steps), round(ramp * steps), final)
    return ReplacementAware(model, molts, schedule, molt_train, sample, consistency)


# -- output ----------------------------------------------------------------------------------


def summary_table(report: dict[str, Any]) -> str:
    """Markdown table of the test results, one row per arm and fine-tune variant."""
    rows = [
        "| arm | LM steps | CE own | CE one spliced (mean) | CE all spliced | gap all | "
        "gap closed (all) | own CE vs (a) | FVU | L0 | open gates | dead | Jacobian cos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = [(arm, report["arms"][arm], report["comparison"].get(arm, {})) for arm in ARMS]
    results += [
        (f"aware_finetune {name}", v["arm"], v["comparison"])
        for name, v in report.get("finetune_variants", {}).items()
    ]
    for arm, result, cmp in results:
        h = result["test"]
        per_molt = list(h["molts"].values())

        def mean(key: str, per_molt=per_molt) -> float:
            return sum(m[key] for m in per_molt) / len(per_molt)

        closed, own = cmp.get("gap_closed_all"), cmp.get("own_ce_relative_change")
        closed = "-" if closed is None else f"{closed:+.1%}"
        own = "-" if own is None else f"{own:+.1%}"
        rows.append(
            f"| {arm} | {result['compute']['lm_steps']} | {h['ce_own']:.3f} | "
            f"{h['ce_spliced_one_mean']:.3f} | {h['ce_spliced_all']:.3f} | {h['gap_all']:.3f} | "
            f"{closed} | {own} | {mean('fvu'):.3f} | {mean('l0'):.2f} | {mean('open_gates'):.2f} | "
            f"{mean('dead_fraction'):.2f} | {mean('jacobian_cosine'):.3f} |"
        )
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Training curves of every arm (LM CE, held-out CE, mean MOLT FVU / L0 / dead fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    steps = report["config"]["steps"]
    for arm in ARMS:
        curves = report["arms"][arm]["curves"]
        # (c) continues (a): draw it after (a)'s steps.
        offset = steps if arm == "aware_finetune" else 0
        x = [s + offset for s in curves["step"]]
        axes[0, 0].plot(x, curves["train_ce"], label=arm)
        ex = [s + offset for s in curves["eval_step"]]
        axes[0, 1].plot(ex, curves["validation_ce_own"], label=f"{arm}: own")
        if arm != "posthoc":
            spliced = curves["validation_ce_all_spliced"]
            axes[0, 1].plot(ex, spliced, "--", label=f"{arm}: all spliced")
        logs = list(curves["molt"].values())
        mx = [s + offset for s in logs[0]["step"]]
        for ax, key in zip(axes[1], ("fvu", "l0", "dead_fraction"), strict=True):
            mean = [sum(values) / len(values) for values in zip(*(g[key] for g in logs))]
            ax.plot(mx, mean, label=arm)
    titles = [
        ("train CE (nats)", "LM step"),
        ("validation CE (nats)", "LM step"),
        ("",  ""),
        ("MOLT FVU on its batch (mean over layers)", "MOLT update"),
        ("MOLT L0", "MOLT update"),
        ("MOLT dead fraction", "MOLT update"),
    ]  # fmt: skip
    for ax, (title, xlabel) in zip(axes.flat, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if title:
            ax.legend(fontsize=7)
    axes[1, 0].set_yscale("log")
    _bars(axes[0, 2], report)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bars(ax: Any, report: dict[str, Any]) -> None:
    """Final held-out CE per arm: own, one MLP spliced (mean), all spliced."""
    kinds = (("ce_own", "own"), ("ce_spliced_one_mean", "one spliced"), ("ce_spliced_all", "all"))
    width = 0.25
    for i, (key, label) in enumerate(kinds):
        values = [report["arms"][arm]["test"][key] for arm in ARMS]
        ax.bar([j + i * width for j in range(len(ARMS))], values, width, label=label)
    ax.set_xticks([j + width for j in range(len(ARMS))], ARMS)
    ax.set_ylim(bottom=min(report["arms"][a]["test"]["ce_own"] for a in ARMS) * 0.9)
    ax.set_title("final test CE (nats)")
    ax.legend(fontsize=7)


def _setting(text: str) -> tuple[str, Any]:
    """``"FIELD=VALUE"`` -> (field, value parsed as the field's type) for ``--set``."""
    name, sep, value = text.partition("=")
    fields = StudyConfig.__dataclass_fields__
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE with FIELD one of {', '.join(fields)}; got {text!r}"
        )
    kind = type(getattr(QUICK, name))
    if kind is bool:
        if value not in ("0", "1", "false", "true"):
            raise argparse.ArgumentTypeError(f"{name} takes 0/1/false/true, got {value!r}")
        return name, value in ("1", "true")
    try:
        return name, kind(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{name} takes a {kind.__name__}: {e}") from e


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:FIELD=VALUE[,FIELD=VALUE...]"`` -> (name, overrides) for ``--finetune-variant``."""
    name, sep, settings = text.partition(":")
    if not sep or not name or not settings:
        raise argparse.ArgumentTypeError(
            f"expected NAME:FIELD=VALUE[,FIELD=VALUE...], got {text!r}"
        )
    overrides = dict(_setting(item) for item in settings.split(","))
    unknown = set(overrides) - FINETUNE_FIELDS
    if unknown:
        raise argparse.ArgumentTypeError(
            f"a fine-tune variant sets only {', '.join(sorted(FINETUNE_FIELDS))}; got "
            f"{', '.join(sorted(unknown))}"
        )
    return name, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molt_kernels study replacement-aware",
        description="Post-hoc MOLTs vs replacement-aware training of a small GPT (CPU).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="800 LM steps per arm, no dropout, instead of the full 1600 with dropout 0.1",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        type=_setting,
        help="override a StudyConfig field, e.g. --set steps=400 --set molt_k=2 (repeatable)",
    )
    parser.add_argument(
        "--finetune-variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE[,...]",
        type=_variant,
        help="one more fine-tune (c) of the same (a) with these fields changed (fields: "
        f"{', '.join(sorted(FINETUNE_FIELDS))}); repeatable",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: the model is small, and on the loaded "
        "2-core machine 2 threads ran about 3x slower than 1; --jobs uses the second core)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="processes: 2 (default) runs arm (b) beside (a) then (c); 1 runs them in turn",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, **dict(args.set))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    variants = dict(args.finetune_variant)
    report = run_study(cfg, not args.no_progress, args.jobs, variants)
    (args.out / "replacement_aware.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    plot(report, args.out / "replacement_aware.png")
    print(summary_table(report))
    print(f"wrote {args.out / 'replacement_aware.json'} and replacement_aware.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
