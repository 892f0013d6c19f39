"""nn.Module layers, thin over :mod:`molt_kernels.functional`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..ops.dtypes import accumulator_dtype
from . import functional as MF
from .backend import check_backend_name
from .config import MOLTConfig, normal_quantile
from .io import PretrainedLayer

PENALTY_FORMS = ("tanh", "l1")
MIN_INIT_THRESHOLD = 1e-2


class MOLT(PretrainedLayer, nn.Module):
    """Sparse mixture of low-rank transforms: y = sum_{t in topk} g_t U_t V_t x + b_dec.

    Parameters: ``W_gate`` [T, d_in], ``b_gate`` [T], ``U[b]`` [n_b, d_out, r_b],
    ``V[b]`` [n_b, r_b, d_in], ``b_dec`` [d_out] (None without ``cfg.decoder_bias``), and
    ``log_threshold`` [T] for jumprelu. With ``cfg.standardize``, buffers ``input_mean``,
    ``input_std`` [d_in], ``output_mean``, ``output_std`` [d_out] wrap the layer; with
    ``cfg.scale_gate_by_norm`` the gate ranks n_t * pre_t (see :class:`MOLTConfig`).
    ``backend`` (or ``$MOLT_KERNELS_BACKEND``) picks the implementation; see ``backend.py``.
    ``deterministic=False`` (an attribute, like ``backend``; not saved) opts the triton decode
    into its fp32 atomic combine: faster by the cost model, rounding varies from run to run.
    Stored with ``save_pretrained`` / ``from_pretrained`` (``cfg.json`` + ``model.safetensors``).
    """

    KIND = "molt"
    CONFIG = MOLTConfig

    def __init__(
        self,
        cfg: MOLTConfig,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        deterministic: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, MOLTConfig):
            raise TypeError(f"cfg must be a MOLTConfig, got {type(cfg).__name__}")
        check_backend_name(backend)
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        self.cfg = cfg
        self.backend = backend
        self.deterministic = deterministic
        f = dict(device=device, dtype=dtype)
        t = cfg.n_transforms
        self.W_gate = nn.Parameter(torch.empty(t, cfg.d_in, **f))
        self.b_gate = nn.Parameter(torch.empty(t, **f))
        self.U = nn.ParameterList(
            nn.Parameter(torch.empty(n, cfg.d_out, r, **f)) for r, n in cfg.rank_counts.items()
        )
        self.V = nn.ParameterList(
            nn.Parameter(torch.empty(n, r, cfg.d_in, **f)) for r, n in cfg.rank_counts.items()
        )
        if cfg.decoder_bias:
            self.b_dec = nn.Parameter(torch.empty(cfg.d_out, **f))
        else:
            self.register_parameter("b_dec", None)
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.empty(t, **f))
        else:
            self.register_parameter("log_threshold", None)
        if cfg.standardize:
            for side, width in (("input", cfg.d_in), ("output", cfg.d_out)):
                self.register_buffer(f"{side}_mean", torch.zeros(width, **f))
                self.register_buffer(f"{side}_std", torch.ones(width, **f))
        # While cached_gate_norms() is active: [] until the norms are first needed, then [norms].
        self._cached_norms: list[Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gates open about ``cfg.init_l0`` transforms per token for unit-variance inputs, and the
        layer's output norm starts near ``init_scale`` times the input norm."""
        cfg = self.cfg
        t = cfg.n_transforms
        l0 = cfg.expected_l0_at_init
        # W_gate rows ~ N(0, 1/d_in): pre-activations are ~N(0, 1) for unit-variance inputs, so a
        # cut at the (1 - l0/T) normal quantile opens about l0 of them.
        nn.init.normal_(self.W_gate, std=1.0 / math.sqrt(cfg.d_in))
        cut = normal_quantile(1.0 - l0 / t) if l0 < t else -math.inf
        self.b_gate.zero_()
        if cfg.activation == "relu" and math.isfinite(cut):
            self.b_gate.fill_(-cut)
        if cfg.activation == "jumprelu":
            self.log_threshold.fill_(math.log(max(cut, MIN_INIT_THRESHOLD)))
        for u, v in zip(self.U, self.V):
            r = v.shape[1]
            nn.init.normal_(v, std=1.0 / math.sqrt(cfg.d_in))
            # l0 active transforms with random output directions add in quadrature.
            nn.init.normal_(u, std=cfg.init_scale / math.sqrt(r * l0))
        if self.b_dec is not None:
            self.b_dec.zero_()

    # -- the layer ---------------------------------------------------------------------------

    def _gate_args(self) -> dict:
        cfg = self.cfg
        return dict(
            k=cfg.k,
            activation=cfg.activation,
            log_threshold=self.log_threshold,
            bandwidth=cfg.jumprelu_bandwidth,
            backend=self.backend,
            norm_scale=self.gate_norm_scale() if cfg.scale_gate_by_norm else None,
        )

    def standardize_input(self, x: Tensor) -> Tensor:
        """(x - input_mean) / input_std in x's dtype with ``cfg.standardize``, else x."""
        if not self.cfg.standardize:
            return x
        return ((x - self.input_mean) / self.input_std).to(x.dtype)

    def destandardize_output(self, y: Tensor) -> Tensor:
        """y * output_std + output_mean in y's dtype with ``cfg.standardize``, else y."""
        if not self.cfg.standardize:
            return y
        return (y * self.output_std + self.output_mean).to(y.dtype)

    def encode(self, x: Tensor, *, k: int | None | str = "cfg") -> tuple[Tensor, Tensor]:
        """x [..., d_in] -> gates [..., k] (fp32 for half x), indices [..., k] int64.

        ``k`` replaces ``cfg.k`` for this call (e.g. k annealing while training); ``"cfg"``
        keeps it.
        """
        xs = self.standardize_input(x)
        args = self._gate_args() if k == "cfg" else {**self._gate_args(), "k": k}
        return MF.gate_topk(xs, self.W_gate, self.b_gate, **args)

    def decode(self, x: Tensor, gates: Tensor, indices: Tensor) -> Tensor:
        """y [..., d_out] from x [..., d_in] and the (gates, indices) of :meth:`encode`."""
        xs = self.standardize_input(x)
        y = MF.lowrank_mixture(
            xs, gates, indices, list(self.U), list(self.V), self.b_dec, self.backend,
            deterministic=self.deterministic,
        )
        return self.destandardize_output(y)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> y [..., d_out], in x's dtype."""
        xs = self.standardize_input(x)
        weights = (self.W_gate, self.b_gate, list(self.U), list(self.V), self.b_dec)
        y = MF.molt(xs, *weights, **self._gate_args(), deterministic=self.deterministic)
        return self.destandardize_output(y)

    def gate_norm_scale(self) -> Tensor:
        """The gate's n_t = ||U_t V_t||_F [T], detached: a constant of the backward (see
        ``MOLTConfig.scale_gate_by_norm``). Computed on every call, or once inside
        :meth:`cached_gate_norms`."""
        if self._cached_norms:
            return self._cached_norms[0]
        with torch.no_grad():
            norms = self.transform_norms()
        if self._cached_norms is not None:
            self._cached_norms.append(norms)
        return norms

    @contextmanager
    def cached_gate_norms(self) -> Iterator[MOLT]:
        """Inside the block the norm-scaled gate computes n_t once and reuses it: for inference
        with fixed weights, where the O(sum_t r_t^2 (d_in + d_out)) norms would otherwise be
        recomputed by every call. Changes to U or V inside the block are not seen."""
        if self._cached_norms is not None:  # nested: the outer block owns the cache
            yield self
            return
        self._cached_norms = []
        try:
            yield self
        finally:
            self._cached_norms = None

    def transform_norms(self) -> Tensor:
        """||U_t V_t||_F for every transform [T], exactly, without forming U_t V_t; in the
        accumulation dtype (fp32 for half parameters, fp64 for fp64).

        ||U V||_F^2 = trace(V^T U^T U V) = sum((U^T U) * (V V^T)): O(r^2 (d_in + d_out)) each.
        The Gram sum can cancel (off-diagonal terms of either sign), so half parameters are read
        in fp32: in bf16 a norm of 0.016 came out as 0 and closed that transform's gate.
        """
        dtype = accumulator_dtype(self.U[0].dtype)
        norms = []
        for u, v in zip(self.U, self.V):
            u, v = u.to(dtype), v.to(dtype)
            gram_u = torch.bmm(u.transpose(1, 2), u)
            gram_v = torch.bmm(v, v.transpose(1, 2))
            norms.append((gram_u * gram_v).sum((1, 2)).clamp_min(0).sqrt())
        return torch.cat(norms)

    def sparsity_penalty(
        self, gates: Tensor, indices: Tensor, form: str = "tanh", c: float = 1.0
    ) -> Tensor:
        """Mean over tokens of sum_t tanh(c |g_t| ||U_t V_t||_F) (``form="tanh"``) or of
        sum_t |g_t| ||U_t V_t||_F (``form="l1"``), for (gates, indices) from :meth:`encode`."""
        if form not in PENALTY_FORMS:
            raise ValueError(f"form must be one of {PENALTY_FORMS}, got {form!r}")
        scaled = gates.abs() * self.transform_norms().to(gates.dtype)[indices]
        per_pair = torch.tanh(c * scaled) if form == "tanh" else scaled
        return per_pair.sum(-1).mean() if per_pair.numel() else per_pair.sum()

    def extra_repr(self) -> str:
        c = self.cfg
        options = [name for name in ("scale_gate_by_norm", "standardize") if getattr(c, name)]
        options += [] if c.decoder_bias else ["decoder_bias=False"]
        return (
            f"d_in={c.d_in}, d_out={c.d_out}, rank_counts={c.rank_counts}, k={c.k}, "
            f"activation={c.activation!r}, backend={self.backend!r}"
            + "".join(f", {o}" for o in options)
        )
