"""Replacement-layer metrics: reconstruction (FVU, normalised MSE), sparsity (L0, per rank bucket,
dead transforms) and Jacobian faithfulness against the MLP being replaced."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..layers.config import MOLTConfig


def _check_same_shape(pred: Tensor, target: Tensor) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise TypeError(f"{name} must be a tensor [..., d], got {type(t).__name__}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have one shape, got {list(pred.shape)} and {list(target.shape)}"
        )


def _check_tokens(name: str, x: Tensor, width: int | None = None) -> None:
    """x is a 2-d tensor [N, width] (any width when None)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or (width is not None and x.shape[1] != width):
        want = f"[N, {width}]" if width is not None else "[N, d]"
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-d tensor {want}, got {got}")


def fvu(pred: Tensor, target: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||target - pred||^2 / sum ||target - mean||^2.

    pred, target [..., d]; the mean is over all leading dims (tokens). Returns a 0-d tensor.
    """
    _check_same_shape(pred, target)
    target = target.reshape(-1, target.shape[-1]).double()
    pred = pred.reshape(-1, pred.shape[-1]).double()
    residual = (target - pred).square().sum()
    total = (target - target.mean(0)).square().sum()
    return residual / total


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    """mean ||target - pred||^2 / mean ||target||^2 (0-d tensor)."""
    _check_same_shape(pred, target)
    return (target.double() - pred.double()).square().sum() / target.double().square().sum()


def l0(gates: Tensor) -> Tensor:
    """Mean number of non-zero gates per token; gates [..., k] (0-d tensor)."""
    return (gates != 0).sum(-1).double().mean()


def l0_per_bucket(gates: Tensor, indices: Tensor, cfg: MOLTConfig) -> dict[int, float]:
    """Mean active transforms per token in each rank bucket, keyed by rank."""
    if gates.shape != indices.shape:
        raise ValueError(
            f"gates and indices must have one shape, got {list(gates.shape)}, "
            f"{list(indices.shape)}"
        )
    offsets = torch.tensor(cfg.bucket_offsets[1:-1], device=indices.device)
    bucket = torch.bucketize(indices, offsets, right=True)
    active = gates != 0
    n_tokens = max(1, active[..., 0].numel()) if active.shape[-1] else 1
    return {
        rank: (active & (bucket == b)).sum().item() / n_tokens for b, rank in enumerate(cfg.ranks)
    }


@torch.no_grad()
def fired_units(gates: Tensor, indices: Tensor, n_units: int) -> Tensor:
    """[n_units] bool: which units have a non-zero gate somewhere in gates / indices [..., k]."""
    fired = torch.zeros(n_units, dtype=torch.bool, device=indices.device)
    return fired.index_fill_(0, indices[gates != 0].reshape(-1), True)


class DeadTracker:
    """Tracks which transforms (or features) fired within the last ``window`` tokens.

    A unit is dead when it has not fired (non-zero gate) in the window; ``update`` is called with
    each batch's (gates, indices).
    """

    def __init__(self, n_units: int, window: int) -> None:
        if n_units < 1 or window < 1:
            raise ValueError(f"n_units and window must be >= 1, got {n_units}, {window}")
        self.window = window
        self.tokens_seen = 0
        self.last_fired = torch.full((n_units,), -1, dtype=torch.int64)

    @torch.no_grad()
    def update(self, gates: Tensor, indices: Tensor) -> None:
        n_tokens = gates.reshape(-1, gates.shape[-1]).shape[0]
        self.mark(fired_units(gates, indices, len(self.last_fired)), n_tokens)

    def mark(self, fired: Tensor, n_tokens: int) -> None:
        """Record a batch of ``n_tokens`` tokens in which the units ``fired`` [n_units] bool
        fired (e.g. the union over the ranks of a data-parallel step)."""
        self.tokens_seen += n_tokens
        self.last_fired[fired.cpu()] = self.tokens_seen

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"tokens_seen": self.tokens_seen, "last_fired": self.last_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.last_fired.copy_(state["last_fired"])

    def dead_mask(self) -> Tensor:
        """[n_units] bool; before a full window has passed, "never fired so far"."""
        horizon = self.tokens_seen - self.window
        return self.last_fired < 0 if horizon < 0 else self.last_fired <= horizon

    def dead_fraction(self) -> float:
        return self.dead_mask().double().mean().item()


@torch.no_grad()
def molt_jacobian(layer: nn.Module, x: Tensor, chunk: int = 64) -> Tensor:
    """Closed-form d y / d x of a MOLT at each token: x [N, d_in] -> J [N, d_out, d_in].

    J = sum_{t active} g_t U_t V_t + (U_t V_t x) act'(pre_t) W_gate[t]^T. The top-k selection is
    locally constant, and act'(pre_t) = 1 for every active gate of relu, jumprelu (away from the
    threshold) and identity, so both terms run over the active transforms only. A norm-scaled gate
    (act(n_t pre_t) / n_t) has the same derivative; with standardisation x is standardised first
    and J scaled to diag(output_std) J diag(1 / input_std).
    """
    cfg: MOLTConfig = layer.cfg
    _check_tokens("x", x, cfg.d_in)
    gates, indices = layer.encode(x)
    x = layer.standardize_input(x)
    offsets = cfg.bucket_offsets
    out = []
    for lo in range(0, x.shape[0], chunk):
        xs, gs, idx = x[lo : lo + chunk], gates[lo : lo + chunk], indices[lo : lo + chunk]
        jac = xs.new_zeros(xs.shape[0], cfg.d_out, cfg.d_in)
        for slot in range(idx.shape[1]):
            t, g = idx[:, slot], gs[:, slot].to(xs.dtype)
            for b in range(cfg.n_buckets):
                rows = ((t >= offsets[b]) & (t < offsets[b + 1]) & (g != 0)).nonzero()[:, 0]
                if rows.numel() == 0:
                    continue
                local = t[rows] - offsets[b]
                uv = torch.bmm(layer.U[b][local], layer.V[b][local])  # [n, d_out, d_in]
                z = torch.bmm(uv, xs[rows, :, None])  # [n, d_out, 1]
                jac[rows] += g[rows, None, None] * uv + z * layer.W_gate[t[rows], None, :]
        if cfg.standardize:
            jac = jac * layer.output_std[:, None] / layer.input_std
        out.append(jac)
    return torch.cat(out) if out else x.new_zeros(0, cfg.d_out, cfg.d_in)


@torch.no_grad()
def transcoder_jacobian(layer: nn.Module, x: Tensor) -> Tensor:
    """Closed-form d y / d x of a TopK transcoder: J = sum_{j active} W_dec[f_j]^T W_enc[f_j]
    (+ W_skip). x [N, d_in] -> J [N, d_out, d_in]."""
    _check_tokens("x", x, layer.cfg.d_in)
    acts, indices = layer.encode(x)
    active = (acts != 0).to(x.dtype)
    jac = torch.einsum("nk,nko,nki->noi", active, layer.W_dec[indices], layer.W_enc[indices])
    if getattr(layer, "W_skip", None) is not None:
        jac = jac + layer.W_skip
    return jac


def module_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 16) -> Tensor:
    """d fn / d x per token by reverse-mode autograd: x [N, d_in] -> [N, d_out, d_in].

    ``fn`` maps [n, d_in] -> [n, d_out] token-wise (an MLP block, or a replacement layer on any
    backend). Each token is repeated d_out times and the i-th copy's output i is differentiated,
    so one plain forward and backward per chunk of tokens give whole Jacobians: no torch.func
    transform is involved, so layers whose autograd is hand-written (the sparse and fused MOLT
    backends) and data-dependent routing work as they do in training.
    """
    _check_tokens("x", x)
    out = []
    for lo in range(0, x.shape[0], chunk):
        xs = x[lo : lo + chunk].detach()
        n, d_in = xs.shape
        with torch.no_grad():
            d_out = fn(xs[:1]).shape[-1]
        copies = xs.repeat_interleave(d_out, dim=0).requires_grad_(True)  # [n * d_out, d_in]
        with torch.enable_grad():
            y = fn(copies).reshape(n, d_out, d_out)
            picked = torch.diagonal(y, dim1=1, dim2=2).sum()
            (grad,) = torch.autograd.grad(picked, copies)
        out.append(grad.reshape(n, d_out, d_in))
    return torch.cat(out) if out else x.new_zeros(0, 0, x.shape[-1])


def jacobian_cosine(jac_a: Tensor, jac_b: Tensor) -> Tensor:
    """Cosine similarity of the flattened Jacobians at each token: [N, o, i] x2 -> [N]."""
    a, b = jac_a.flatten(1).double(), jac_b.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)
