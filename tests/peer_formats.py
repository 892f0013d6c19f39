"""The three peer formats as their own code writes and computes them, for the interop tests.

Written from the peers' math (OpenMOSS Language-Model-SAEs ``models/molt.py``, the MOLT branch of
crosslayer-transcoder ``model/molt.py``, EleutherAI sparsify ``sparse_coder.py``), independently
of ``molt_kernels.interop``: checkpoint builders that write the peer's exact files with random
weights, and float64 forwards (dense, every transform for every token, then masked) with the
peer's own straight-through estimators, so gradients can be compared too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

# ------------------------------------------------------------------------------------------------
# OpenMOSS Language-Model-SAEs: config.json + sae_weights.safetensors

OPENMOSS_HOOK_IN = "blocks.3.ln2.hook_normalized"
OPENMOSS_HOOK_OUT = "blocks.3.hook_mlp_out"


def openmoss_checkpoint(
    path: Path,
    *,
    d_model: int,
    rank_counts: dict[int, int],
    act_fn: str = "topk",
    top_k: int = 3,
    use_decoder_bias: bool = True,
    sparsity_include_decoder_norm: bool = True,
    jumprelu_threshold_window: float = 2.0,
    dataset_norms: tuple[float, float] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[dict, dict[str, Tensor]]:
    """Write an OpenMOSS MOLT directory with random weights; returns (config, tensors).

    ``rank_counts`` is written in the order given (their loader sorts the ranks ascending).
    ``dataset_norms`` = (input norm, output norm) makes it a "dataset-wise" file; without it the
    file is in "inference" mode and the norm scalars hold NaN, as their ``torch.empty`` would hold
    garbage.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    n_transforms = sum(rank_counts.values())
    config = {
        "sae_type": "molt",
        "d_model": d_model,
        "expansion_factor": n_transforms / d_model,
        "use_decoder_bias": use_decoder_bias,
        "act_fn": act_fn,
        "norm_activation": "dataset-wise" if dataset_norms else "inference",
        "sparsity_include_decoder_norm": sparsity_include_decoder_norm,
        "top_k": top_k,
        "use_triton_kernel": False,
        "sparsity_threshold_for_triton_spmm_kernel": 0.996,
        "jumprelu_threshold_window": jumprelu_threshold_window,
        "hook_point_in": OPENMOSS_HOOK_IN,
        "hook_point_out": OPENMOSS_HOOK_OUT,
        "rank_counts": {str(r): c for r, c in rank_counts.items()},
    }
    tensors = {
        "W_E": randn(d_model, n_transforms, scale=d_model**-0.5),
        "b_E": randn(n_transforms, scale=0.3),
    }
    for rank in sorted(rank_counts):
        count = rank_counts[rank]
        tensors[f"U_matrices.{rank}"] = randn(count, d_model, rank, scale=(d_model * rank) ** -0.25)
        tensors[f"V_matrices.{rank}"] = randn(count, rank, d_model, scale=(d_model * rank) ** -0.25)
    if use_decoder_bias:
        tensors["b_D"] = randn(d_model, scale=0.1)
    if act_fn == "jumprelu":
        tensors["activation_function.log_jumprelu_threshold"] = randn(n_transforms, scale=0.5)
    norms = dataset_norms or (math.nan, math.nan)
    for hook, value in zip((OPENMOSS_HOOK_IN, OPENMOSS_HOOK_OUT), norms):
        tensors[f"dataset_average_activation_norm.{hook}"] = torch.tensor(value, dtype=dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=4))
    save_file(tensors, str(path / "sae_weights.safetensors"), {"version": "2.0.0"})
    return config, tensors


class _OpenMossJumpReLU(torch.autograd.Function):
    """Their STE: d/d pre = 1[pre > theta]; d/d theta = -(theta / w) inside |pre - theta| < w/2
    where pre > 0. ``upper_only`` keeps only pre > theta of that window (the side our sparse
    decode can count; see the interop tests)."""

    @staticmethod
    def forward(ctx, pre, theta, window, upper_only):
        mask = pre > theta
        ctx.save_for_backward(pre, theta)
        ctx.window, ctx.upper_only = window, upper_only
        return pre * mask

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        inside = ((pre - theta).abs() < ctx.window * 0.5) & (pre > 0.0)
        if ctx.upper_only:
            inside &= pre > theta
        d_theta = (torch.where(inside, -theta / ctx.window, 0.0) * grad).sum(0)
        return grad * (pre > theta), d_theta, None, None


def openmoss_forward(
    config: dict, tensors: dict[str, Tensor], x: Tensor, *, threshold_upper_only: bool = False
) -> Tensor:
    """Their MOLT forward on raw x [N, d] -> raw y [N, d], dense: normalise (dataset-wise), encode
    (decoder-norm scaling around the activation), decode every transform, denormalise."""
    d_model = config["d_model"]
    ranks = sorted(int(r) for r in config["rank_counts"])
    f_in = f_out = 1.0
    if config["norm_activation"] == "dataset-wise":
        norm = {
            hook: tensors[f"dataset_average_activation_norm.{hook}"].item()
            for hook in (config["hook_point_in"], config["hook_point_out"])
        }
        f_in = math.sqrt(d_model) / norm[config["hook_point_in"]]
        f_out = math.sqrt(d_model) / norm[config["hook_point_out"]]
    x = x * f_in
    pre = x @ tensors["W_E"] + tensors["b_E"]
    scaled = config["sparsity_include_decoder_norm"]
    if scaled:
        # ||U_t V_t||_F from the product itself, as their decoder_norm computes it.
        norms = torch.cat(
            [
                torch.bmm(tensors[f"U_matrices.{r}"], tensors[f"V_matrices.{r}"])
                .flatten(1)
                .norm(dim=1)
                for r in ranks
            ]
        )
        pre = pre * norms
    act_fn = config["act_fn"]
    if act_fn == "relu":
        acts = pre * pre.gt(0)
    elif act_fn == "topk":
        acts = pre * pre.gt(0)
        with torch.no_grad():
            keep = torch.zeros_like(acts, dtype=torch.bool)
            keep.scatter_(1, acts.topk(config["top_k"], dim=1, sorted=False).indices, True)
        acts = acts * keep
    elif act_fn == "jumprelu":
        theta = tensors["activation_function.log_jumprelu_threshold"].exp()
        acts = _OpenMossJumpReLU.apply(
            pre, theta, config["jumprelu_threshold_window"], threshold_upper_only
        )
    else:
        raise ValueError(act_fn)
    if scaled:
        acts = acts / norms
    y = torch.zeros_like(x)
    start = 0
    for r in ranks:
        U, V = tensors[f"U_matrices.{r}"], tensors[f"V_matrices.{r}"]
        count = V.shape[0]
        vx = torch.einsum("nd,crd->ncr", x, V) * acts[:, start : start + count, None]
        y = y + torch.einsum("ncr,cdr->nd", vx, U)
        start += count
    if config["use_decoder_bias"]:
        y = y + tensors["b_D"]
    return y / f_out


# ------------------------------------------------------------------------------------------------
# crosslayer-transcoder, branch MOLT: a Lightning .ckpt of MoltModule


def crosslayer_checkpoint(
    path: Path,
    *,
    d_acts: int,
    n: int,
    ranks: list[int],
    n_layers: int = 3,
    bandwidth: float = 1.0,
    layerwise: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Write a Lightning checkpoint of their MoltModule (JumpReLU, Dimensionwise standardisers,
    or Layerwise ones with ``layerwise``); returns the Molt's own state dict (no ``model.``)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    model: dict[str, Tensor] = {}
    stat_shape = (n_layers,) if layerwise else (n_layers, d_acts)
    model["input_standardizer.mean"] = randn(*stat_shape, scale=0.5)
    model["input_standardizer.std"] = (randn(*stat_shape).abs() + 0.5).to(dtype)
    model["output_standardizer.mean"] = randn(*stat_shape, scale=0.5)
    model["output_standardizer.std"] = (randn(*stat_shape).abs() + 0.5).to(dtype)
    counts = [n << i for i in range(len(ranks))]
    n_features = sum(counts)
    model["nonlinearity.theta"] = (randn(1, n_features, scale=0.3).abs() + 0.05).to(dtype)
    model["nonlinearity.bandwidth"] = torch.tensor(bandwidth, dtype=dtype)
    model["e.weight"] = randn(n_features, d_acts, scale=d_acts**-0.5)
    model["e.bias"] = randn(n_features, scale=0.3)
    for i, (rank, count) in enumerate(zip(ranks, counts)):
        model[f"Us.{i}"] = randn(count, rank, d_acts, scale=(d_acts * rank) ** -0.25)
        model[f"Vs.{i}"] = randn(count, d_acts, rank, scale=(d_acts * rank) ** -0.25)
    state = {f"model.{k}": v for k, v in model.items()}
    state["last_active"] = torch.zeros(n_features, dtype=torch.long)
    checkpoint = {
        "epoch": 0,
        "global_step": 20000,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"learning_rate": 2e-4, "lambda_sparsity": 5e-4, "c_sparsity": 100},
    }
    torch.save(checkpoint, path)
    return model


class _CrosslayerJumpReLU(torch.autograd.Function):
    """Their JumpReLU: forward pre * 1[pre > theta and pre > 0]; backward passes the gradient to
    pre wherever pre >= 0 (below the threshold too), and d/d theta = -(theta / bw) *
    1[-bw/2 < pre - theta <= bw/2]. The flags swap in the variants our sparse layer computes:
    ``exact_pre_grad`` passes the gradient only where the gate is open, ``upper_only`` keeps the
    threshold window's pre > theta side."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth, exact_pre_grad, upper_only):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.exact_pre_grad, ctx.upper_only = bandwidth, exact_pre_grad, upper_only
        return pre * ((pre > theta) & (pre > 0))

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        z = (pre - theta) / ctx.bandwidth
        window = (z > -0.5) & ~(z > 0.5)
        if ctx.upper_only:
            window &= z > 0
        d_theta = (-(theta / ctx.bandwidth) * window * grad).sum(0, keepdim=True)
        passes = (pre > theta) & (pre > 0) if ctx.exact_pre_grad else pre >= 0
        return grad * passes, d_theta, None, None, None


def crosslayer_forward(
    model: dict[str, Tensor],
    x: Tensor,
    layer: int,
    *,
    exact_pre_grad: bool = False,
    threshold_upper_only: bool = False,
) -> Tensor:
    """Their Molt.forward(x, layer)[2]: standardise, gate, every transform, de-standardise."""

    def row(name: str) -> Tensor:
        stat = model[name][layer]
        return stat.expand(x.shape[-1]) if stat.dim() == 0 else stat  # Layerwise: one scalar

    xs = (x - row("input_standardizer.mean")) / row("input_standardizer.std")
    pre = xs @ model["e.weight"].T + model["e.bias"]
    gate = _CrosslayerJumpReLU.apply(
        pre,
        model["nonlinearity.theta"],
        model["nonlinearity.bandwidth"].item(),
        exact_pre_grad,
        threshold_upper_only,
    )
    recons = []
    i = 0
    while f"Us.{i}" in model:
        latents = torch.einsum("bd,ndr->bnr", xs, model[f"Vs.{i}"])
        recons.append(torch.einsum("bnr,nrd->bnd", latents, model[f"Us.{i}"]))
        i += 1
    y_std = (gate[..., None] * torch.cat(recons, dim=1)).sum(1)
    return y_std * row("output_standardizer.std") + row("output_standardizer.mean")


# ------------------------------------------------------------------------------------------------
# EleutherAI sparsify: cfg.json + sae.safetensors (transcode=True)


def sparsify_checkpoint(
    path: Path,
    *,
    d_in: int,
    num_latents: int,
    k: int,
    skip_connection: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **cfg_overrides,
) -> tuple[dict, dict[str, Tensor]]:
    """Write a sparsify transcoder directory with random weights; returns (cfg, tensors)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip_connection,
        "transcode": True,
        **cfg_overrides,
        "d_in": d_in,
    }
    tensors = {
        "encoder.weight": randn(num_latents, d_in, scale=d_in**-0.5),
        "encoder.bias": randn(num_latents, scale=0.3),
        "W_dec": randn(num_latents, d_in, scale=0.5),
        "b_dec": randn(d_in, scale=0.1),
    }
    if skip_connection:
        tensors["W_skip"] = randn(d_in, d_in, scale=d_in**-0.5)
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae.safetensors"), {"format": "pt"})
    return cfg, tensors


def sparsify_forward(cfg: dict, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    """Their SparseCoder.forward(x).sae_out for a transcoder: top-k of relu(x W^T + b), summed
    decoder rows, b_dec, and the skip connection."""
    pre = torch.relu(x @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
    y = (values[..., None] * tensors["W_dec"][indices]).sum(-2) + tensors["b_dec"]
    if cfg["skip_connection"]:
        y = y + x @ tensors["W_skip"].T
    return y
