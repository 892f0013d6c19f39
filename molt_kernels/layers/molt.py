"""nn.Module layers, thin over :mod:`molt_kernels.functional`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as MF
from .backend import check_backend_name
from .config import MOLTConfig, normal_quantile
from .io import PretrainedLayer

PENALTY_FORMS = ("tanh", "l1")
MIN_INIT_THRESHOLD = 1e-2


class MOLT(PretrainedLayer, nn.Module):
    """Sparse mixture of low-rank transforms: y = sum_{t in topk} g_t U_t V_t x + b_dec.

    Parameters: ``W_gate`` [T, d_in], ``b_gate`` [T], ``U[b]`` [n_b, d_out, r_b],
    ``V[b]`` [n_b, r_b, d_in], ``b_dec`` [d_out], and ``log_threshold`` [T] for jumprelu.
    ``backend`` (or ``$MOLT_KERNELS_BACKEND``) picks the implementation; see ``backend.py``.
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
    ) -> None:
        super().__init__()
        if not isinstance(cfg, MOLTConfig):
            raise TypeError(f"cfg must be a MOLTConfig, got {type(cfg).__name__}")
        check_backend_name(backend)
        self.cfg = cfg
        self.backend = backend
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
        self.b_dec = nn.Parameter(torch.empty(cfg.d_out, **f))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.empty(t, **f))
        else:
            self.register_parameter("log_threshold", None)
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
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., d_in] -> gates [..., k] (fp32 for half x), indices [..., k] int64."""
        return MF.gate_topk(x, self.W_gate, self.b_gate, **self._gate_args())

    def decode(self, x: Tensor, gates: Tensor, indices: Tensor) -> Tensor:
        """y [..., d_out] from x [..., d_in] and the (gates, indices) of :meth:`encode`."""
        return MF.lowrank_mixture(
            x, gates, indices, list(self.U), list(self.V), self.b_dec, self.backend
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> y [..., d_out], in x's dtype."""
        return MF.molt(
            x, self.W_gate, self.b_gate, list(self.U), list(self.V), self.b_dec, **self._gate_args()
        )

    def transform_norms(self) -> Tensor:
        """||U_t V_t||_F for every transform [T], exactly, without forming U_t V_t.

        ||U V||_F^2 = trace(V^T U^T U V) = sum((U^T U) * (V V^T)): O(r^2 (d_in + d_out)) each.
        """
        norms = []
        for u, v in zip(self.U, self.V):
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
        return (
            f"d_in={c.d_in}, d_out={c.d_out}, rank_counts={c.rank_counts}, k={c.k}, "
            f"activation={c.activation!r}, backend={self.backend!r}"
        )
