"""MOLTs of crosslayer-transcoder's MOLT branch (``model/molt.py``): a Lightning ``.ckpt``.

The checkpoint holds no architecture, only the ``state_dict``; the Molt's entries sit under
``model.`` (anything else, such as ``last_active`` or metric state, is ignored):

- ``e.weight`` [T, d], ``e.bias`` [T]: the gate (our ``W_gate``, ``b_gate``);
- ``Us.<i>`` [n_i, r_i, d] (rank -> output) and ``Vs.<i>`` [n_i, d, r_i] (input -> rank): bucket i,
  in the order of their ``ranks`` list (512, 256, ... by default); ours are the transposes;
- ``nonlinearity.theta`` [1, T] (or [T]): the raw JumpReLU threshold, ``nonlinearity.bandwidth``:
  the width of its rectangle window;
- ``input_standardizer.{mean,std}`` and ``output_standardizer.{mean,std}``: [n_layers, d]
  (Dimensionwise) or [n_layers] (Layerwise); absent for the identity Standardizer.

Their forward at ``layer``: xs = (x - in_mean[layer]) / in_std[layer]; gate = jumprelu(xs e^T + b)
= pre * 1[pre > theta and pre > 0]; y = (sum_t gate_t U_t V_t xs) * out_std[layer] +
out_mean[layer], with no decoder bias. The converted layer is a MOLT with ``standardize=True``,
``decoder_bias=False``, k=None, jumprelu with log_threshold = log(theta) (theta <= 0 gives -inf:
threshold 0, i.e. their relu-like mask pre > 0).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from torch import Tensor

from ..layers.molt import MOLT
from ._files import check_keys, check_shape, config_or_error, positive_finite

PREFIX = "model."
GATE_KEYS = ("e.weight", "e.bias", "nonlinearity.theta", "nonlinearity.bandwidth")
STANDARDIZERS = ("input_standardizer", "output_standardizer")
STANDARDIZER_KEYS = tuple(f"{name}.{stat}" for name in STANDARDIZERS for stat in ("mean", "std"))


def _read_state(path: Path, weights_only: bool) -> dict[str, Tensor]:
    """The Molt's tensors of a Lightning checkpoint (or a bare state dict), without ``model.``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # torch's messages run over many lines; the cause is the last one before the docs link.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if not ln.startswith("Check the doc")), "")
        hint = ""
        if weights_only and "Unsupported global" in cause:
            hint = "; if you trust the file, load it with weights_only=False"
        raise ValueError(f"{path} is not a readable torch checkpoint: {cause}{hint}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    if any(name.startswith(PREFIX) for name in state):
        return {n[len(PREFIX) :]: t for n, t in state.items() if n.startswith(PREFIX)}
    return dict(state)


def _buckets(source: str, state: dict[str, Tensor], d: int) -> list[tuple[int, int]]:
    """[(rank, count)] of Us.0, Us.1, ... in stored order, checked against Vs.<i>."""
    buckets = []
    while f"Us.{len(buckets)}" in state or f"Vs.{len(buckets)}" in state:
        i = len(buckets)
        if f"Us.{i}" not in state or f"Vs.{i}" not in state:
            raise ValueError(f"{source}: bucket {i} needs both model.Us.{i} and model.Vs.{i}")
        u, v = state[f"Us.{i}"], state[f"Vs.{i}"]
        if u.dim() != 3:
            raise ValueError(f"{source}: model.Us.{i} must be [n, rank, d], got {list(u.shape)}")
        count, rank = u.shape[0], u.shape[1]
        check_shape(source, f"model.Us.{i}", u, (count, rank, d))
        check_shape(source, f"model.Vs.{i}", v, (count, d, rank))
        if count == 0 or rank == 0:
            raise ValueError(f"{source}: bucket {i} is empty ({count} transforms of rank {rank})")
        buckets.append((rank, count))
    if not buckets:
        raise ValueError(f"{source}: no transforms (model.Us.0 / model.Vs.0 missing)")
    ranks = [r for r, _ in buckets]
    if len(set(ranks)) != len(ranks):
        raise ValueError(
            f"{source}: buckets repeat a rank ({ranks}); one bucket per rank is supported"
        )
    return buckets


def _standardizer_rows(
    source: str, state: dict[str, Tensor], name: str, layer: int, d: int
) -> tuple[Tensor, Tensor] | None:
    """(mean [d], std [d]) of ``name`` at ``layer``; None for the identity Standardizer."""
    keys = (f"{name}.mean", f"{name}.std")
    present = [k in state for k in keys]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"{source}: model.{name} needs both mean and std")
    rows = []
    for key in keys:
        stat = state[key]
        if stat.dim() not in (1, 2) or (stat.dim() == 2 and stat.shape[1] != d):
            raise ValueError(
                f"{source}: model.{key} must be [n_layers, {d}] or [n_layers], "
                f"got {list(stat.shape)}"
            )
        if not 0 <= layer < stat.shape[0]:
            raise ValueError(f"layer must be in [0, {stat.shape[0]}) for {source}, got {layer}")
        row = stat[layer]
        rows.append(row.expand(d) if row.dim() == 0 else row)  # Layerwise: one value per layer
    if not bool((rows[1] > 0).all()):
        raise ValueError(f"{source}: model.{name}.std has entries <= 0 at layer {layer}")
    return rows[0], rows[1]


def load_crosslayer_transcoder(
    path: str | Path, layer: int, backend: str | None = None, *, weights_only: bool = True
) -> MOLT:
    """Read a crosslayer-transcoder MOLT checkpoint (JumpReLU) into a :class:`MOLT` for ``layer``.

    ``layer`` picks the standardisers' row. The architecture is inferred from the tensor shapes;
    the layer has the gate weight's dtype (other tensors are cast to it). ``weights_only`` is
    passed to ``torch.load``: keep it True unless you trust the file.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    path = Path(path)
    source = str(path)
    state = _read_state(path, weights_only)
    for key in GATE_KEYS:
        if key not in state:
            raise ValueError(
                f"{source}: missing tensor model.{key} (a JumpReLU Molt has {list(GATE_KEYS)})"
            )
    w_gate = state["e.weight"]
    if w_gate.dim() != 2:
        raise ValueError(f"{source}: model.e.weight must be [T, d], got {list(w_gate.shape)}")
    n_transforms, d = w_gate.shape
    buckets = _buckets(source, state, d)
    expected = [*GATE_KEYS, *(f"{m}.{i}" for i in range(len(buckets)) for m in ("Us", "Vs"))]
    expected += [k for k in STANDARDIZER_KEYS if k in state]
    check_keys(f"{source} (under model.)", state, expected)
    check_shape(source, "model.e.weight", w_gate, (sum(c for _, c in buckets), d))
    check_shape(source, "model.e.bias", state["e.bias"], (n_transforms,))
    theta = state["nonlinearity.theta"]
    if theta.shape not in ((n_transforms,), (1, n_transforms)):
        raise ValueError(
            f"{source}: model.nonlinearity.theta must be [1, {n_transforms}] (a JumpReLU with "
            f"n_layers=1), got {list(theta.shape)}"
        )
    bandwidth = state["nonlinearity.bandwidth"]
    if bandwidth.numel() != 1:
        raise ValueError(f"{source}: model.nonlinearity.bandwidth must be a scalar")
    bandwidth = positive_finite(source, "model.nonlinearity.bandwidth", bandwidth.item())
    rows = {name: _standardizer_rows(source, state, name, layer, d) for name in STANDARDIZERS}

    cfg = config_or_error(
        source,
        d_in=d,
        rank_counts=dict(buckets),
        k=None,
        activation="jumprelu",
        jumprelu_bandwidth=bandwidth,
        decoder_bias=False,
        standardize=any(r is not None for r in rows.values()),
    )
    dtype = w_gate.dtype
    molt = MOLT(cfg, backend=backend, dtype=dtype)
    with torch.no_grad():
        molt.W_gate.copy_(w_gate)
        molt.b_gate.copy_(state["e.bias"])
        for b in range(len(buckets)):
            molt.U[b].copy_(state[f"Us.{b}"].transpose(1, 2))
            molt.V[b].copy_(state[f"Vs.{b}"].transpose(1, 2))
        theta = theta.reshape(-1).to(dtype)
        # Their mask is pre > theta and pre > 0: a threshold <= 0 is the threshold 0.
        molt.log_threshold.copy_(
            torch.where(theta > 0, theta, 1).log().masked_fill(theta <= 0, -math.inf)
        )
        for side, name in (("input", "input_standardizer"), ("output", "output_standardizer")):
            if rows[name] is not None:
                getattr(molt, f"{side}_mean").copy_(rows[name][0])
                getattr(molt, f"{side}_std").copy_(rows[name][1])
    return molt
