"""`python -m molt_kernels study pareto`: MOLT vs TopK transcoder Pareto frontiers on real MLPs.

On all-MiniLM-L6-v2 (offline), for each layer: the MLP's (mlp_in, mlp_out) pairs are captured over
the training texts, and separately over disjoint held-out texts (CPython's pydoc topics, shuffled
once; the last ``HELD_OUT_FRACTION`` of the texts). Then, for each seed, four curves are trained on
the same training tokens and evaluated on the same held-out tokens:

- ``molt`` / ``threshold``: the paper allocation (N x 256 ... 16N x 16 at d=384), gated by the
  activation alone (k=None, JumpReLU with learned thresholds), trained with the tanh penalty
  scaled by the transforms' Frobenius norms, over a sweep of the sparsity coefficient;
- ``molt`` / ``topk``: the same allocation gated by a top-k, over a k sweep (no penalty);
- ``molt-uniform`` / ``topk``: one rank for every transform, with the paper allocation's parameter
  count (within 1%), over the same k sweep; and, with ``uniform_threshold``, the
  same uniform allocation threshold-gated over the threshold curve's coefficient sweep (the
  paper's own ablation setting; ``--uniform-threshold``, off by default for time);
- ``transcoder`` / ``topk``: the TopK transcoder with the paper allocation's parameter count
  (:func:`molt_kernels.layers.flops.matched_transcoder`), over a k sweep.

Matched comparisons: every point sees the same training tokens in the same order (the trainer's
shuffle is seeded by the seed, not by the kind), the same optimiser (AdamW), batch size and number
of steps; the top-k curves train on reconstruction alone. Tuning effort: the learning rate is the
only setting tuned per kind, from the same two-value pilot (see ``LEARNING_RATES``); everything
else is the trainer's default for every kind.

Per point (one record in ``DIR/pareto.json``): parameters; held-out FVU and normalised MSE; L0
(transforms or features per token); dead fraction (units that fire on none of the held-out tokens);
the mean cosine between the layer's closed-form Jacobian and the MLP's (autograd) Jacobian on
``jacobian_tokens`` held-out tokens; matmul FLOPs per token, forward (the gate and the active
transforms' ranks as routed on the held-out tokens; a transcoder's encoder and k decoder rows) and
training (forward + backward = 3x forward); wall times; and the spliced-in effect: the mean cosine
between the sentence embeddings of held-out texts with the layer in place of the MLP and without,
the MLP kept at [CLS]/[SEP] (the layers never train on them; :func:`spliced_embeddings`), and
with the layer at every token (``embedding_cosine_all_tokens``). ``meta`` holds, per layer, the
same cosine for the MLP replaced by its mean output (``mean_ablation_embedding_cosine``).
Plots: FVU vs L0, Jacobian cosine vs L0, FVU vs forward FLOPs per token, one panel per layer, one
curve per (kind, gating), markers at the mean over seeds with bars spanning the seeds' min..max.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molt_kernels.interp.capture import capture_mlp_activations
from molt_kernels.interp.data import iter_texts
from molt_kernels.interp.metrics import (
    fvu,
    jacobian_cosine,
    l0,
    module_jacobian,
    molt_jacobian,
    normalized_mse,
    transcoder_jacobian,
)
from molt_kernels.interp.models import load_minilm, minilm_mlp_path
from molt_kernels.interp.replace import get_module, replaced
from molt_kernels.interp.train import TrainConfig, train
from molt_kernels.layers.config import MOLTConfig
from molt_kernels.layers.flops import (
    matched_transcoder,
    molt_cost,
    routed_active_rank,
    transcoder_cost,
)
from molt_kernels.layers.molt import MOLT
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig
from molt_kernels.tools.bench.report import render_table

KINDS = ("molt", "molt-uniform", "transcoder")
HELD_OUT_FRACTION = 0.1
MAX_PARAM_MISMATCH = 0.01
# Chosen per kind from the same pilot: lr in {1e-3, 3e-3}, 1000 steps, one mid-sparsity point per
# curve, layer 3, seed 0, held-out FVU (bench/RESULTS.md, "MOLT vs transcoder" has the numbers).
LEARNING_RATES = {"molt": 1e-3, "molt-uniform": 1e-3, "transcoder": 3e-3}
RECORD_FIELDS = (
    "kind", "gating", "layer", "seed", "k", "sparsity_coef", "activation", "shape", "params",
    "params_ratio", "fvu", "nmse", "l0", "dead_fraction", "jacobian_cosine", "embedding_cosine",
    "embedding_cosine_all_tokens",
    "flops_forward", "flops_train", "active_rank", "train_fvu", "train_l0",
    "train_dead_fraction", "steps", "batch_size", "lr", "train_tokens", "eval_tokens",
    "train_seconds", "eval_seconds",
)  # fmt: skip


@dataclass(frozen=True)
class PointSpec:
    """One trained layer of a curve: its kind, gating and sweep value (k or sparsity coef)."""

    kind: str
    gating: str
    k: int | None
    sparsity_coef: float

    @property
    def curve(self) -> str:
        return f"{self.kind} ({self.gating})"

    @property
    def sweep_value(self) -> float:
        return self.sparsity_coef if self.gating == "threshold" else float(self.k)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's numbers; stored in ``pareto.json``.

    ``n``: the paper allocation's N. ``threshold_activation`` / ``threshold_init_l0``: the
    threshold-gated MOLT's gate and the transforms it opens per token at init.
    ``train_tokens`` None: every training token the texts give (~115k per layer).
    ``workers``: processes training points in parallel, ``threads`` torch threads each.
    ``uniform_threshold``: also train the uniform allocation with threshold gating.
    """

    layers: tuple[int, ...] = (1, 3)
    seeds: tuple[int, ...] = (0, 1)
    n: int = 1
    threshold_activation: str = "jumprelu"
    threshold_init_l0: float = 16.0
    sparsity_coefs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    molt_ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    transcoder_ks: tuple[int, ...] = (4, 8, 16, 32, 64)
    steps: int = 300
    batch_size: int = 512
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))
    train_tokens: int | None = 65536
    eval_tokens: int = 8192
    jacobian_tokens: int = 128
    embedding_texts: int = 64
    workers: int = 2
    threads: int = 1
    uniform_threshold: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "seeds", "sparsity_coefs", "molt_ks", "transcoder_ks"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if min(self.layers) < 0 or min(self.seeds) < 0:
            raise ValueError(f"layers and seeds must be >= 0, got {self.layers}, {self.seeds}")
        for name in ("n", "steps", "batch_size", "eval_tokens", "jacobian_tokens", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if set(self.learning_rates) != set(KINDS):
            raise ValueError(f"learning_rates needs exactly the kinds {KINDS}")

    def points(self) -> list[PointSpec]:
        """Every point of one (layer, seed), curve by curve."""
        return (
            [PointSpec("molt", "threshold", None, c) for c in self.sparsity_coefs]
            + [PointSpec("molt", "topk", k, 0.0) for k in self.molt_ks]
            + [PointSpec("molt-uniform", "topk", k, 0.0) for k in self.molt_ks]
            + [
                PointSpec("molt-uniform", "threshold", None, c)
                for c in (self.sparsity_coefs if self.uniform_threshold else ())
            ]
            + [PointSpec("transcoder", "topk", k, 0.0) for k in self.transcoder_ks]
        )

    def paper_config(self, k: int | None, activation: str = "relu", **kw: Any) -> MOLTConfig:
        return MOLTConfig.paper(D_MODEL, self.n, k, activation=activation, **kw)


D_MODEL = 384  # all-MiniLM-L6-v2

FULL = StudyConfig()
QUICK = StudyConfig(
    layers=(3,),
    seeds=(0,),
    steps=300,
    train_tokens=32768,
    eval_tokens=4096,
)


def uniform_rank_counts(cfg: MOLTConfig) -> dict[int, int]:
    """``{rank: count}`` with one rank whose MOLT has ``cfg``'s parameter count, as closely as
    any rank within a factor 2 of ``cfg``'s mean rank allows (ties: the rank nearest the mean)."""
    target = cfg.n_parameters()
    mean_rank = cfg.total_rank / cfg.n_transforms
    best: tuple[float, float, int, int] | None = None
    for rank in range(max(1, math.floor(mean_rank / 2)), math.ceil(2 * mean_rank) + 1):
        per_transform = cfg.d_in + 1 + rank * (cfg.d_in + cfg.d_out)
        count = max(1, round((target - cfg.d_out) / per_transform))
        trial = replace(cfg, rank_counts={rank: count}, k=None)
        key = (abs(trial.n_parameters() - target), abs(rank - mean_rank), rank, count)
        best = key if best is None or key < best else best
    return {best[2]: best[3]}


def build_layer(study: StudyConfig, spec: PointSpec) -> nn.Module:
    """The freshly initialised layer of a point (seed the torch RNG first)."""
    if spec.kind == "transcoder":
        return TopKTranscoder(matched_transcoder(study.paper_config(None), k=spec.k))
    if spec.gating == "threshold":
        cfg = study.paper_config(None, study.threshold_activation, init_l0=study.threshold_init_l0)
    else:
        cfg = study.paper_config(spec.k)
    if spec.kind == "molt-uniform":
        cfg = replace(cfg, rank_counts=uniform_rank_counts(cfg))
    return MOLT(cfg)


# -- per-layer data -------------------------------------------------------------------------------


def split_texts() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): disjoint, from one fixed shuffle of the corpus."""
    texts = list(iter_texts(seed=0))
    cut = int(len(texts) * (1 - HELD_OUT_FRACTION))
    return texts[:cut], texts[cut:]


def _capture(model: nn.Module, path: str, texts: list[str], max_tokens: int | None):
    pairs = capture_mlp_activations(model, path, texts, max_tokens=max_tokens, progress=False)
    x, y = (torch.cat(t) for t in zip(*pairs, strict=True))
    return x, y


def prepare_layer(study: StudyConfig, model: nn.Module, layer: int) -> dict[str, Any]:
    """Training / held-out activations, the MLP's Jacobians and the reference embeddings of one
    layer: everything a point needs besides the model itself."""
    path = minilm_mlp_path(layer)
    train_texts, held_out_texts = split_texts()
    x, y = _capture(model, path, train_texts, study.train_tokens)
    x_eval, y_eval = _capture(model, path, held_out_texts, study.eval_tokens)
    # Jacobian tokens: a fixed random subset of the held-out tokens (spread over many texts).
    pick = torch.randperm(len(x_eval), generator=torch.Generator().manual_seed(0))
    x_jac = x_eval[pick[: study.jacobian_tokens]]
    embedding_texts = held_out_texts[: study.embedding_texts]
    embeddings = model.encode(embedding_texts)
    # Reference for the spliced-in effect: the MLP replaced by its mean output (mean ablation).
    ablated = spliced_embeddings(model, layer, ConstantOutput(y.mean(0)), embedding_texts)
    return {
        "layer": layer,
        "x": x,
        "y": y,
        "x_eval": x_eval,
        "y_eval": y_eval,
        "x_jac": x_jac,
        "jac_mlp": module_jacobian(get_module(model, path), x_jac),
        "embedding_texts": embedding_texts,
        "embeddings": embeddings,
        "mean_ablation_embedding_cosine": _mean_cosine(ablated, embeddings),
    }


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a, b, dim=1).mean().item()


class SpliceExceptAt(nn.Module):
    """``replacement(x)``, except at the positions ``keep_original`` [B, T] bool (set before each
    forward; None: nowhere), which get ``original(x)``."""

    def __init__(self, original: nn.Module, replacement: nn.Module) -> None:
        super().__init__()
        self.original, self.replacement = original, replacement
        self.keep_original: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.replacement(x)
        if self.keep_original is None:
            return out
        return torch.where(self.keep_original[..., None], self.original(x), out)


@torch.no_grad()
def spliced_embeddings(
    model: nn.Module,
    layer: int,
    replacement: nn.Module,
    texts: list[str],
    at_special_tokens: bool = False,
    batch_size: int = 32,
) -> torch.Tensor:
    """Sentence embeddings [len(texts), 384] with ``replacement`` in place of layer ``layer``'s MLP.

    The replacements are trained without [CLS]/[SEP] (``capture_mlp_activations`` drops them, and
    their MLP outputs are outliers), so by default those positions keep the MLP, as replacement
    models keep the original MLP at BOS; ``at_special_tokens=True`` replaces them too.
    """
    path = minilm_mlp_path(layer)
    splice = SpliceExceptAt(get_module(model, path), replacement)
    out = []
    with replaced(model, {path: splice}):
        for lo in range(0, len(texts), batch_size):
            batch = model.tokenize(texts[lo : lo + batch_size], return_special_tokens_mask=True)
            special = batch.pop("special_tokens_mask").bool()
            splice.keep_original = None if at_special_tokens else special
            out.append(model.embed(**batch))
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


class ConstantOutput(nn.Module):
    """Maps [..., d_in] to ``value`` [d_out] at every token: a mean-ablated MLP."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(*x.shape[:-1], -1)


# -- one point ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(layer: nn.Module, data: dict[str, Any], model: nn.Module) -> dict[str, float | None]:
    """Held-out metrics of a trained layer (see the module docstring)."""
    x_eval, y_eval = data["x_eval"], data["y_eval"]
    gates, indices = layer.encode(x_eval)
    pred = layer.decode(x_eval, gates, indices)
    n_units = layer.cfg.n_transforms if isinstance(layer, MOLT) else layer.cfg.n_features
    fired = torch.zeros(n_units, dtype=torch.bool)
    fired[indices[gates != 0]] = True
    if isinstance(layer, MOLT):
        active_rank = routed_active_rank(layer.cfg, indices, gates)
        cost = molt_cost(layer.cfg, active_rank)
        jac = molt_jacobian(layer, data["x_jac"])
    else:
        active_rank, cost = None, transcoder_cost(layer.cfg)
        jac = transcoder_jacobian(layer, data["x_jac"])
    texts, reference = data["embedding_texts"], data["embeddings"]
    spliced, spliced_all = (
        spliced_embeddings(model, data["layer"], layer, texts, at_special_tokens=everywhere)
        for everywhere in (False, True)
    )
    return {
        "fvu": fvu(pred, y_eval).item(),
        "nmse": normalized_mse(pred, y_eval).item(),
        "l0": l0(gates).item(),
        "dead_fraction": 1.0 - fired.double().mean().item(),
        "jacobian_cosine": jacobian_cosine(jac, data["jac_mlp"]).mean().item(),
        "embedding_cosine": _mean_cosine(spliced, reference),
        "embedding_cosine_all_tokens": _mean_cosine(spliced_all, reference),
        "flops_forward": cost.forward,
        "flops_train": cost.forward_backward,
        "active_rank": active_rank,
    }


def _shape(layer: nn.Module) -> dict[str, Any]:
    cfg = layer.cfg
    if isinstance(cfg, TranscoderConfig):
        return {"n_features": cfg.n_features}
    return {"rank_counts": [[r, c] for r, c in cfg.rank_counts.items()]}


def run_point(
    study: StudyConfig, spec: PointSpec, seed: int, data: dict[str, Any], model: nn.Module
) -> dict[str, Any]:
    """Train and evaluate one point; returns its ``pareto.json`` record."""
    torch.manual_seed(seed)
    layer = build_layer(study, spec)
    lr = study.learning_rates[spec.kind]
    settings = TrainConfig(
        steps=study.steps,
        batch_size=study.batch_size,
        lr=lr,
        sparsity_coef=spec.sparsity_coef,
        log_every=max(1, study.steps // 10),
        seed=seed,
        progress=False,
    )
    log = train(layer, data["x"], data["y"], settings)
    start = time.perf_counter()
    metrics = evaluate(layer, data, model)
    eval_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in layer.parameters())
    last = log.last()
    return {
        "kind": spec.kind,
        "gating": spec.gating,
        "layer": data["layer"],
        "seed": seed,
        "k": spec.k,
        "sparsity_coef": spec.sparsity_coef,
        "activation": getattr(layer.cfg, "activation", "relu"),
        "shape": _shape(layer),
        "params": params,
        "params_ratio": params / study.paper_config(None).n_parameters(),
        **metrics,
        "train_fvu": last["fvu"],
        "train_l0": last["l0"],
        "train_dead_fraction": last["dead_fraction"],
        "steps": study.steps,
        "batch_size": study.batch_size,
        "lr": lr,
        "train_tokens": int(data["x"].shape[0]),
        "eval_tokens": int(data["x_eval"].shape[0]),
        "train_seconds": log.seconds,
        "eval_seconds": eval_seconds,
    }


# -- scheduling: in process, or in spawned workers that load each layer's data from disk ----------


@cache
def _worker_model() -> nn.Module:
    return load_minilm()


@cache
def _worker_data(data_file: str) -> dict[str, Any]:
    return torch.load(data_file, weights_only=True)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_task(task: tuple[StudyConfig, PointSpec, int, str]) -> dict[str, Any]:
    study, spec, seed, data_file = task
    return run_point(study, spec, seed, _worker_data(data_file), _worker_model())


def run_study(
    study: StudyConfig,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], object] = print,
    command: str = "",
) -> list[dict[str, Any]]:
    """Run every (seed, layer, point), seed by seed, so that a study stopped early holds whole
    curves. ``pareto.json`` is rewritten after each point. Returns the records."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_minilm()
    meta = _meta(study, command)
    started = time.perf_counter()
    layer_data: dict[int, dict[str, Any]] = {}
    for layer in study.layers:
        data = layer_data[layer] = prepare_layer(study, model, layer)
        meta["mean_ablation_embedding_cosine"][layer] = data["mean_ablation_embedding_cosine"]
        log(
            f"layer {layer}: {len(data['x'])} training / {len(data['x_eval'])} held-out tokens, "
            f"mean-ablation embedding cosine {data['mean_ablation_embedding_cosine']:.4f}, "
            f"{time.perf_counter() - started:.0f}s"
        )
    jobs = [
        (spec, seed, layer)
        for seed in study.seeds
        for layer in study.layers
        for spec in study.points()
    ]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="pareto", unit="pt", disable=not progress, mininterval=5)

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        meta["seconds"] = time.perf_counter() - started
        write_json(out_dir / "pareto.json", meta, records)
        bar.update(1)
        log(
            f"[{len(records)}/{len(jobs)} {meta['seconds']:.0f}s] layer {record['layer']} seed "
            f"{record['seed']} {record['kind']} ({record['gating']}) k={record['k']} "
            f"coef={record['sparsity_coef']:g}: FVU {record['fvu']:.3f} L0 {record['l0']:.2f} "
            f"jac {record['jacobian_cosine']:.3f} emb {record['embedding_cosine']:.4f} "
            f"dead {record['dead_fraction']:.2f} ({record['train_seconds']:.0f}s)"
        )

    cache_dir = out_dir / ".cache"
    try:
        if study.workers == 1:
            for spec, seed, layer in jobs:
                done(run_point(study, spec, seed, layer_data[layer], model))
        else:
            cache_dir.mkdir(exist_ok=True)
            files = {layer: str(cache_dir / f"layer{layer}.pt") for layer in study.layers}
            for layer, data in layer_data.items():
                torch.save(data, files[layer])
            layer_data.clear()
            pool = get_context("spawn").Pool(
                study.workers, initializer=_worker_init, initargs=(study.threads,)
            )
            try:
                tasks = [(study, spec, seed, files[layer]) for spec, seed, layer in jobs]
                for record in pool.imap_unordered(_worker_task, tasks):
                    done(record)
                pool.close()
            except BaseException:
                pool.terminate()  # stopped or failed: at once, no queued point runs on
                raise
            finally:
                pool.join()
    finally:
        bar.close()
        for path in cache_dir.glob("layer*.pt"):
            path.unlink()
        if cache_dir.exists():
            cache_dir.rmdir()
    meta["load_average_after"] = list(os.getloadavg())
    records.sort(key=_record_order)
    write_json(out_dir / "pareto.json", meta, records)
    return records


def _record_order(r: dict[str, Any]) -> tuple:
    return (r["layer"], KINDS.index(r["kind"]), r["gating"], r["seed"], r["k"] or 0,
            r["sparsity_coef"])  # fmt: skip


def _meta(study: StudyConfig, command: str) -> dict[str, Any]:
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
        "config": asdict(study),
        "paper_params": study.paper_config(None).n_parameters(),
        "mean_ablation_embedding_cosine": {},  # layer -> cosine, the floor for embedding_cosine
    }


def write_json(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "points": records}, indent=1))
    tmp.replace(path)


def read_json(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    report = json.loads(Path(path).read_text())
    return report["meta"], report["points"]


def merge_runs(run_dirs: Sequence[Path], out_dir: Path) -> list[dict[str, Any]]:
    """The points of several runs' ``pareto.json`` in one ``out_dir/pareto.json`` (meta: the runs'
    metas); a (layer, seed, point) present twice is an error. Returns the merged records."""
    metas, records, seen = [], [], set()
    for run_dir in run_dirs:
        meta, points = read_json(Path(run_dir) / "pareto.json")
        metas.append(meta)
        for r in points:
            key = (r["layer"], r["seed"], r["kind"], r["gating"], r["k"], r["sparsity_coef"])
            if key in seen:
                raise ValueError(f"point {key} is in more than one of {list(run_dirs)}")
            seen.add(key)
            records.append(r)
    records.sort(key=_record_order)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "pareto.json", {"merged_runs": metas}, records)
    return records


# -- summaries: table and plots -------------------------------------------------------------------


def _curves(records: list[dict[str, Any]]) -> Iterator[tuple[int, str, list[list[dict]]]]:
    """(layer, curve name, points: the records of one sweep value across seeds), in order."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=_record_order):
        spec = PointSpec(r["kind"], r["gating"], r["k"], r["sparsity_coef"])
        groups[(r["layer"], spec.curve)][spec.sweep_value].append(r)
    for (layer, curve), by_value in sorted(groups.items()):
        yield layer, curve, list(by_value.values())


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ±{half:.3f}"


def _mean(values: list[float], spec: str) -> str:
    return format(statistics.fmean(values), spec) if values else "-"


def summary_table(records: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (layer, curve, sweep value), means over seeds (± half the
    seeds' range)."""
    headers = [
        "layer", "curve", "k / coef", "params", "L0", "FVU", "NMSE", "Jac cos", "emb cos",
        "emb cos all", "dead", "FLOP/tok fwd", "train s", "seeds",
    ]  # fmt: skip
    rows = []
    for layer, curve, points in _curves(records):
        for group in points:
            first = group[0]

            def get(key: str, group: list[dict] = group) -> list[float]:
                return [r[key] for r in group if r.get(key) is not None]  # absent in old runs

            sweep = first["k"] if first["gating"] == "topk" else f"{first['sparsity_coef']:g}"
            rows.append([
                layer, curve, sweep, f"{first['params']:,}", _spread(get("l0")),
                _spread(get("fvu")), _spread(get("nmse")), _spread(get("jacobian_cosine")),
                _mean(get("embedding_cosine"), ".4f"),
                _mean(get("embedding_cosine_all_tokens"), ".4f"),
                f"{statistics.fmean(get('dead_fraction')):.2f}",
                f"{statistics.fmean(get('flops_forward')) / 1e6:.2f}M",
                f"{statistics.fmean(get('train_seconds')):.0f}", len(group),
            ])  # fmt: skip
    return render_table(headers, rows)


EQUAL_L0 = (2.0, 4.0, 8.0, 16.0)


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at x by linear interpolation in log(x) between the nearest points of a curve; None
    outside the curve's x range. xs need not be sorted."""
    points = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return (y0 + y1) / 2
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def equal_l0_table(records: list[dict[str, Any]], l0_values: Sequence[float] = EQUAL_L0) -> str:
    """Markdown table of each curve's FVU, Jacobian cosine and forward FLOPs per token at the
    same L0, interpolated (log L0) between its seed-mean points; "-" outside its L0 range."""
    headers = ["layer", "curve"]
    for v in l0_values:
        headers += [f"FVU @L0={v:g}", f"Jac @{v:g}", f"FLOP/tok @{v:g}"]
    rows = []
    for layer, curve, points in _curves(records):
        mean = {
            key: [statistics.fmean(r[key] for r in group) for group in points]
            for key in ("l0", "fvu", "jacobian_cosine", "flops_forward")
        }
        row = [layer, curve]
        for v in l0_values:
            f, j, c = (
                interpolate_at(mean["l0"], mean[key], v)
                for key in ("fvu", "jacobian_cosine", "flops_forward")
            )
            row += ["-"] * 3 if f is None else [f"{f:.3f}", f"{j:.3f}", f"{c / 1e6:.2f}M"]
        rows.append(row)
    return render_table(headers, rows)


PLOTS = (
    ("fvu_vs_l0.png", "l0", "fvu", "L0 (transforms or features per token)", "held-out FVU"),
    ("jacobian_vs_l0.png", "l0", "jacobian_cosine", "L0", "Jacobian cosine vs the MLP"),
    ("fvu_vs_flops.png", "flops_forward", "fvu", "forward FLOPs per token", "held-out FVU"),
)


def write_plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The three PNGs of :data:`PLOTS`; needs matplotlib (``pip install -e ".[study]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('the plots need matplotlib: pip install -e ".[study]"') from e
    layers = sorted({r["layer"] for r in records})
    curves = sorted({c for _, c, _ in _curves(records)})
    colors = {c: f"C{i}" for i, c in enumerate(curves)}
    written = []
    for name, x_key, y_key, x_label, y_label in PLOTS:
        fig, axes = plt.subplots(
            1, len(layers), figsize=(5 * len(layers), 4), squeeze=False, sharey=True
        )
        for ax, layer in zip(axes[0], layers):
            for curve_layer, curve, points in _curves(records):
                if curve_layer != layer:
                    continue
                xs = [[r[x_key] for r in group] for group in points]
                ys = [[r[y_key] for r in group] for group in points]
                mx, my = [statistics.fmean(v) for v in xs], [statistics.fmean(v) for v in ys]
                order = sorted(range(len(mx)), key=mx.__getitem__)
                ax.errorbar(
                    [mx[i] for i in order],
                    [my[i] for i in order],
                    xerr=[[mx[i] - min(xs[i]) for i in order], [max(xs[i]) - mx[i] for i in order]],
                    yerr=[[my[i] - min(ys[i]) for i in order], [max(ys[i]) - my[i] for i in order]],
                    marker="o",
                    markersize=4,
                    capsize=2,
                    color=colors[curve],
                    label=curve,
                )
            ax.set_xscale("log")
            ax.set_xlabel(x_label)
            ax.set_title(f"MiniLM layer {layer} MLP")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)  # per panel: layers can have different curves
        axes[0][0].set_ylabel(y_label)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# -- command line ---------------------------------------------------------------------------------


def _positive_floats(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> tuple[StudyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="molt_kernels study pareto",
        description="MOLT vs TopK transcoder Pareto frontiers on all-MiniLM-L6-v2 MLPs "
        "(offline). Writes DIR/pareto.json and three PNG plots.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced: layer 3, seed 0, 300 steps on 32k training tokens",
    )
    parser.add_argument("--layers", type=int, nargs="+", help="MiniLM layers (0-5)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds")
    parser.add_argument("--steps", type=int, help="training steps per point")
    parser.add_argument("--n", type=int, help="paper allocation N")
    parser.add_argument("--sparsity-coefs", type=_positive_floats, help="threshold sweep")
    parser.add_argument("--workers", type=int, help="parallel training processes")
    parser.add_argument(
        "--uniform-threshold",
        action="store_true",
        help="also train the uniform-rank MOLT with threshold gating (5 more points per layer "
        "and seed, the slowest kind)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render",
        nargs="*",
        type=Path,
        metavar="RUN_DIR",
        help="train nothing: print the tables and draw the plots of DIR/pareto.json, or of the "
        "points of the RUN_DIRs' pareto.json merged into DIR/pareto.json",
    )
    args = parser.parse_args(list(argv))
    study = QUICK if args.quick else FULL
    overrides = {
        "layers": tuple(args.layers) if args.layers else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "steps": args.steps,
        "n": args.n,
        "sparsity_coefs": args.sparsity_coefs,
        "workers": args.workers,
        "uniform_threshold": args.uniform_threshold or None,
    }
    study = replace(study, **{k: v for k, v in overrides.items() if v is not None})
    if max(study.layers) >= 6:
        parser.error(f"--layers: MiniLM has layers 0-5, got {study.layers}")
    return study, args


def main(argv: Sequence[str] | None = None) -> int:
    # A stopped study (kill, timeout) unwinds like Ctrl-C: the workers are shut down and the
    # cached activations deleted; pareto.json keeps the points already finished.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = list(sys.argv[1:] if argv is None else argv)
    study, args = parse_args(argv)
    if args.render:
        records = merge_runs(args.render, args.out)
    elif args.render is not None:
        _, records = read_json(args.out / "pareto.json")
    else:
        command = "python -m molt_kernels study pareto " + shlex.join(argv)
        records = run_study(study, args.out, progress=not args.no_progress, command=command)
    print(summary_table(records))
    print()
    print(equal_l0_table(records))
    for path in write_plots(records, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
