"""OpenMOSS Language-Model-SAEs MOLTs (``sae_type: "molt"``): ``config.json`` +
``sae_weights.safetensors``.

Their format, as their ``MixtureOfLinearTransform`` saves it and its strict loader reads it:

- tensors ``W_E`` [d, T] (x @ W_E: the transpose of our ``W_gate``), ``b_E`` [T],
  ``U_matrices.<r>`` [n_r, d, r] and ``V_matrices.<r>`` [n_r, r, d] (our layouts), ``b_D`` [d] when
  ``use_decoder_bias``, ``activation_function.log_jumprelu_threshold`` [T] for jumprelu, and
  scalars ``dataset_average_activation_norm.<hook>`` (used only in "dataset-wise" mode);
- buckets in ascending rank order whatever the order of ``rank_counts`` in the JSON, transform
  ids bucket-major;
- ``sparsity_include_decoder_norm`` (default on): pre-activations are multiplied by
  n_t = ||U_t V_t||_F before the activation and top-k, the gates divided by n_t after: our
  ``MOLTConfig.scale_gate_by_norm``;
- ``act_fn``: relu (k=None), jumprelu (k=None, learned log thresholds) or topk (relu, then top_k).
  batchtopk selects over the whole batch, which no per-token layer computes: refused.
- ``norm_activation``: "inference" (raw activations) or "dataset-wise": the MOLT was trained on
  x' = f_in x and y' = f_out y with f = sqrt(d_model) / (dataset average norm). A MOLT is bilinear
  in x (gate and transform both read it), so raw x -> raw y needs, with c = f_in / f_out:
  W_gate = (f_in^2 / f_out) W_E^T, b_gate = c b_E, theta = c theta, b_dec = b_D / f_out, and U, V
  unchanged (so the norms n_t, and the gates' ranking, are unchanged). Their own fold
  (``standardize_parameters_of_dataset_norm``) scales U, V by sqrt(c) and b_E by 1/f_in, which is
  off by a factor f_in; the loader folds correctly instead. Token- and batch-wise modes normalise
  by statistics of the input itself: refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..layers.molt import MOLT
from ._files import (
    check_keys,
    check_shape,
    common_dtype,
    config_or_error,
    field,
    positive_finite,
    positive_int,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NORM_PREFIX = "dataset_average_activation_norm."
THRESHOLD_KEY = "activation_function.log_jumprelu_threshold"
# Defaults of their SparseDictionaryConfig, for fields a config.json may leave out.
DEFAULT_TOP_K = 50
DEFAULT_WINDOW = 2.0
ACT_FNS = ("relu", "jumprelu", "topk")
NORM_MODES = ("inference", "dataset-wise")


def _rank_counts(source: str, config: dict[str, Any]) -> dict[int, int]:
    """{rank: count} in their bucket order: ascending rank, whatever the JSON order."""
    raw = field(source, config, "rank_counts", dict)
    if not raw:
        raise ValueError(f"{source}: rank_counts is empty")
    counts = {}
    for key, count in raw.items():
        try:
            rank = int(key)
        except ValueError:
            raise ValueError(f"{source}: rank_counts key {key!r} is not an int") from None
        positive_int(source, "a rank", rank)
        counts[rank] = positive_int(source, f"count of rank {rank}", count)
    return dict(sorted(counts.items()))


def _dataset_norm_scales(
    source: str, config: dict[str, Any], norms: dict[str, torch.Tensor], d_model: int
) -> tuple[float, float]:
    """(f_in, f_out) = sqrt(d_model) / norm of the input and output hook points."""
    scales = []
    for which in ("hook_point_in", "hook_point_out"):
        hook = field(source, config, which, str)
        if hook not in norms:
            raise ValueError(
                f"{source}: norm_activation is 'dataset-wise' but tensor {NORM_PREFIX}{hook} "
                f"({which}) is missing"
            )
        value = positive_finite(source, f"{NORM_PREFIX}{hook}", float(norms[hook].item()))
        scales.append(math.sqrt(d_model) / value)
    return scales[0], scales[1]


def _fold_dataset_norms(layer: MOLT, f_in: float, f_out: float) -> None:
    """Make a MOLT trained on (f_in x, f_out y) map raw x to raw y: the gate carries c = f_in/f_out
    (pre-activations scaled by c: relu and top-k commute with it, a jumprelu threshold scales with
    it), W_gate one more f_in for its input, b_dec 1/f_out. U and V, hence n_t, are untouched."""
    c = f_in / f_out
    layer.W_gate.mul_(f_in * c)
    layer.b_gate.mul_(c)
    if layer.log_threshold is not None:
        layer.log_threshold.add_(math.log(c))
    if layer.b_dec is not None:
        layer.b_dec.div_(f_out)


def load_openmoss(path: str | Path, backend: str | None = None) -> MOLT:
    """Read an OpenMOSS MOLT directory into a :class:`MOLT` that maps raw x to raw y.

    The layer has the stored dtype and the file's bucket order (ascending rank); dataset-wise
    normalisation is folded into the gate as the module docstring derives.
    """
    path = Path(path)
    source = str(path)
    config = read_json(path / CONFIG_FILE)
    if config.get("sae_type") != "molt":
        raise ValueError(f"{source}: sae_type is {config.get('sae_type')!r}, not 'molt'")
    d_model = positive_int(source, "d_model", config.get("d_model"))
    rank_counts = _rank_counts(source, config)
    act_fn = field(source, config, "act_fn", str, "relu")
    if act_fn not in ACT_FNS:
        raise ValueError(
            f"{source}: act_fn {act_fn!r} is not supported (one of {ACT_FNS}; batchtopk selects "
            "across the batch, which no per-token layer computes)"
        )
    norm_mode = field(source, config, "norm_activation", str, "dataset-wise")
    if norm_mode not in NORM_MODES:
        raise ValueError(
            f"{source}: norm_activation {norm_mode!r} is not supported (one of {NORM_MODES}; "
            "token- and batch-wise normalisation depend on the input itself)"
        )
    use_bias = field(source, config, "use_decoder_bias", bool, True)
    scale_gate = field(source, config, "sparsity_include_decoder_norm", bool, True)
    window = float(field(source, config, "jumprelu_threshold_window", (int, float), DEFAULT_WINDOW))
    k = None
    if act_fn == "topk":
        k = positive_int(source, "top_k", field(source, config, "top_k", int, DEFAULT_TOP_K))

    weights_file = path / WEIGHTS_FILE
    source = str(weights_file)
    tensors = read_safetensors(weights_file)
    # Their loader takes the norm scalars out before its strict state-dict load.
    norms = {n[len(NORM_PREFIX) :]: t for n, t in tensors.items() if n.startswith(NORM_PREFIX)}
    tensors = {n: t for n, t in tensors.items() if not n.startswith(NORM_PREFIX)}
    expected = ["W_E", "b_E"]
    expected += [f"{m}.{r}" for r in rank_counts for m in ("U_matrices", "V_matrices")]
    expected += ["b_D"] if use_bias else []
    expected += [THRESHOLD_KEY] if act_fn == "jumprelu" else []
    check_keys(source, tensors, expected)
    n_transforms = sum(rank_counts.values())
    check_shape(source, "W_E", tensors["W_E"], (d_model, n_transforms))
    check_shape(source, "b_E", tensors["b_E"], (n_transforms,))
    for r, n in rank_counts.items():
        check_shape(source, f"U_matrices.{r}", tensors[f"U_matrices.{r}"], (n, d_model, r))
        check_shape(source, f"V_matrices.{r}", tensors[f"V_matrices.{r}"], (n, r, d_model))
    if use_bias:
        check_shape(source, "b_D", tensors["b_D"], (d_model,))
    if act_fn == "jumprelu":
        check_shape(source, THRESHOLD_KEY, tensors[THRESHOLD_KEY], (n_transforms,))
    dtype = common_dtype(source, tensors.values())

    cfg = config_or_error(
        str(path / CONFIG_FILE),
        d_in=d_model,
        rank_counts=rank_counts,
        k=k,
        activation="jumprelu" if act_fn == "jumprelu" else "relu",
        jumprelu_bandwidth=window,
        scale_gate_by_norm=scale_gate,
        decoder_bias=use_bias,
    )
    layer = MOLT(cfg, backend=backend, dtype=dtype)
    with torch.no_grad():
        layer.W_gate.copy_(tensors["W_E"].T)
        layer.b_gate.copy_(tensors["b_E"])
        for b, r in enumerate(rank_counts):
            layer.U[b].copy_(tensors[f"U_matrices.{r}"])
            layer.V[b].copy_(tensors[f"V_matrices.{r}"])
        if use_bias:
            layer.b_dec.copy_(tensors["b_D"])
        if act_fn == "jumprelu":
            layer.log_threshold.copy_(tensors[THRESHOLD_KEY])
        if norm_mode == "dataset-wise":
            _fold_dataset_norms(layer, *_dataset_norm_scales(str(path), config, norms, d_model))
    return layer


def save_openmoss(
    layer: MOLT, path: str | Path, *, hook_point_in: str, hook_point_out: str
) -> Path:
    """Write ``layer`` as an OpenMOSS MOLT directory ("inference" mode: raw activations).

    Buckets are written in ascending rank order (their numbering), so a layer whose buckets are in
    another order gets its gate rows permuted to match; the function is unchanged. Refuses what
    their MOLT cannot express: d_out != d_in, input/output standardisation, the identity
    activation, jumprelu with a top-k.
    """
    if not isinstance(layer, MOLT):
        raise TypeError(f"layer must be a MOLT, got {type(layer).__name__}")
    for name, hook in (("hook_point_in", hook_point_in), ("hook_point_out", hook_point_out)):
        if not isinstance(hook, str) or not hook:
            raise ValueError(f"{name} must be a non-empty str, got {hook!r}")
    cfg = layer.cfg
    if cfg.d_out != cfg.d_in:
        raise ValueError(
            f"OpenMOSS MOLTs map d_model -> d_model; this layer has d_in={cfg.d_in}, "
            f"d_out={cfg.d_out}"
        )
    if cfg.standardize:
        raise ValueError("OpenMOSS MOLTs have no per-dimension input/output standardisation")
    if cfg.activation == "identity":
        raise ValueError("OpenMOSS MOLTs have no identity gate (act_fn is relu, jumprelu or topk)")
    if cfg.activation == "jumprelu" and cfg.k is not None:
        raise ValueError("OpenMOSS MOLTs have no jumprelu with a top-k (act_fn is one of them)")

    # Our ids of each bucket, the buckets taken in ascending rank order.
    offsets = cfg.bucket_offsets
    ascending = sorted(range(cfg.n_buckets), key=lambda b: cfg.ranks[b])
    order = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in ascending])
    order = order.to(layer.W_gate.device)
    tensors = {"W_E": layer.W_gate[order].T, "b_E": layer.b_gate[order]}
    for b in ascending:
        tensors[f"U_matrices.{cfg.ranks[b]}"] = layer.U[b]
        tensors[f"V_matrices.{cfg.ranks[b]}"] = layer.V[b]
    if cfg.decoder_bias:
        tensors["b_D"] = layer.b_dec
    if cfg.activation == "jumprelu":
        tensors[THRESHOLD_KEY] = layer.log_threshold[order]
    config = {
        "sae_type": "molt",
        "d_model": cfg.d_in,
        "expansion_factor": cfg.n_transforms / cfg.d_in,
        "use_decoder_bias": cfg.decoder_bias,
        "act_fn": "topk" if cfg.k is not None else cfg.activation,
        "norm_activation": "inference",
        "sparsity_include_decoder_norm": cfg.scale_gate_by_norm,
        "top_k": cfg.k if cfg.k is not None else DEFAULT_TOP_K,
        "use_triton_kernel": False,
        "sparsity_threshold_for_triton_spmm_kernel": 0.996,
        "jumprelu_threshold_window": cfg.jumprelu_bandwidth,
        "hook_point_in": hook_point_in,
        "hook_point_out": hook_point_out,
        "rank_counts": {str(cfg.ranks[b]): cfg.counts[b] for b in ascending},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, {n: t.detach() for n, t in tensors.items()})
    write_json(path / CONFIG_FILE, config)
    return path
