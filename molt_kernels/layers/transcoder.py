"""TopK transcoder, the parameter-matched baseline a MOLT is compared against.

    acts, f = topk(relu(x W_enc^T + b_enc))          encode: shares the MOLT gate op
    y       = sum_j acts_j W_dec[f_j] + b_dec (+ W_skip x)

Backends follow :mod:`molt_kernels.backend`. The encoder runs on the chosen backend's gate op. The
decoder is sparse (``F.embedding_bag``: work scales with k, not with the feature count F) on the
``torch`` and ``triton`` backends, and dense on ``reference`` (scatter the acts into [N, F], then
one matmul), which is the oracle and the naive baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.dtypes import compute_dtype
from ..ops.validation import check_indices, check_positive_int, check_tensor, check_x
from . import functional as MF
from .backend import check_backend_name, resolve_backend
from .io import PretrainedLayer


@dataclass(frozen=True)
class TranscoderConfig:
    """Shape of a TopK transcoder.

    Args:
        d_in: input width.
        n_features: number of features F.
        k: features kept per token, in [1, F].
        d_out: output width (defaults to ``d_in``).
        skip: add a linear skip connection ``W_skip`` [d_out, d_in].
    """

    d_in: int
    n_features: int
    k: int
    d_out: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        check_positive_int("d_in", self.d_in)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        check_positive_int("d_out", self.d_out)
        check_positive_int("n_features", self.n_features)
        check_positive_int("k", self.k)
        if self.k > self.n_features:
            raise ValueError(f"k must be in [1, n_features={self.n_features}], got {self.k}")
        if not isinstance(self.skip, bool):
            raise TypeError(f"skip must be a bool, got {type(self.skip).__name__}")

    def n_parameters(self) -> int:
        """F*(d_in+d_out+1) + d_out, plus d_in*d_out with the skip connection."""
        n = self.n_features * (self.d_in + self.d_out + 1) + self.d_out
        return n + (self.d_in * self.d_out if self.skip else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TranscoderConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TranscoderConfig fields: {sorted(unknown)}")
        return cls(**d)


def _check_decode_args(
    x: Tensor,
    acts: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    W_skip: Tensor | None,
) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor [..., d_in], got {type(x).__name__}")
    if not isinstance(W_dec, Tensor) or W_dec.dim() != 2:
        raise ValueError("W_dec must be a 2-d tensor [F, d_out]")
    n_features, d_out = W_dec.shape
    if W_skip is None:
        check_x(x, x.shape[-1])
    else:
        if not isinstance(W_skip, Tensor) or W_skip.dim() != 2:
            raise ValueError("W_skip must be a 2-d tensor [d_out, d_in] or None")
        check_x(x, W_skip.shape[1])
        check_tensor("W_skip", W_skip, (d_out, x.shape[-1]), x.device)
    check_tensor("b_dec", b_dec, (d_out,), x.device)
    check_indices(x, acts, "acts", indices, n_features, "n_features")


def transcoder_decode(
    x: Tensor,
    acts: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    W_skip: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """y [..., d_out] = sum_j acts_j W_dec[indices_j] + b_dec (+ x W_skip^T).

    x [..., d_in] (read only by the skip connection, and for shapes); acts [..., k] float;
    indices [..., k] int64 in [0, F); W_dec [F, d_out]; b_dec [d_out]; W_skip [d_out, d_in].
    Repeated indices add up. Returns x's dtype; half inputs on the CPU are computed in fp32.
    """
    _check_decode_args(x, acts, indices, W_dec, b_dec, W_skip)
    backend = resolve_backend(backend, x.device)
    dtype = compute_dtype(x)
    lead = x.shape[:-1]
    n_tokens = lead.numel()
    a2 = acts.reshape(n_tokens, acts.shape[-1]).to(dtype)
    i2 = indices.reshape(n_tokens, acts.shape[-1])
    W = W_dec.to(dtype)
    if backend == "reference":
        dense = torch.zeros(n_tokens, W.shape[0], dtype=dtype, device=x.device)
        y = dense.scatter_add(1, i2, a2) @ W
    else:
        # Row gathers weighted by the acts: O(k d_out) per token, and W_dec's gradient is an
        # index-add of k rows per token.
        y = F.embedding_bag(i2, W, mode="sum", per_sample_weights=a2)
    y = y + b_dec.to(dtype)
    if W_skip is not None:
        y = y + F.linear(x.reshape(n_tokens, x.shape[-1]).to(dtype), W_skip.to(dtype))
    return y.to(x.dtype).reshape(*lead, W.shape[1])


def _unit_rows_(t: Tensor) -> None:
    nn.init.normal_(t)
    t /= t.norm(dim=1, keepdim=True)


class TopKTranscoder(PretrainedLayer, nn.Module):
    """acts = topk(relu(x W_enc^T + b_enc)); y = sum_j acts_j W_dec[f_j] + b_dec (+ W_skip x).

    Parameters: ``W_enc`` [F, d_in], ``b_enc`` [F], ``W_dec`` [F, d_out], ``b_dec`` [d_out], and
    ``W_skip`` [d_out, d_in] when ``cfg.skip``. ``backend`` as for :class:`molt_kernels.MOLT`.
    """

    KIND = "topk_transcoder"
    CONFIG = TranscoderConfig

    def __init__(
        self,
        cfg: TranscoderConfig,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, TranscoderConfig):
            raise TypeError(f"cfg must be a TranscoderConfig, got {type(cfg).__name__}")
        check_backend_name(backend)
        self.cfg = cfg
        self.backend = backend
        f = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.n_features, cfg.d_in, **f))
        self.b_enc = nn.Parameter(torch.empty(cfg.n_features, **f))
        self.W_dec = nn.Parameter(torch.empty(cfg.n_features, cfg.d_out, **f))
        self.b_dec = nn.Parameter(torch.empty(cfg.d_out, **f))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.empty(cfg.d_out, cfg.d_in, **f))
        else:
            self.register_parameter("W_skip", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm rows of W_dec; W_enc tied to W_dec when d_in == d_out (W_enc = W_dec^T in
        the x @ W convention), else its own unit-norm rows. Unit rows make the pre-activations
        ~N(0, 1) for unit-variance inputs, as the MOLT gates are, so the top k are mostly open.
        Biases and the skip connection start at zero."""
        _unit_rows_(self.W_dec)
        if self.cfg.d_in == self.cfg.d_out:
            self.W_enc.copy_(self.W_dec)
        else:
            _unit_rows_(self.W_enc)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    def encode(self, x: Tensor, *, k: int | str = "cfg") -> tuple[Tensor, Tensor]:
        """x [..., d_in] -> acts [..., k] (fp32 for half x), indices [..., k] int64; ``k``
        replaces ``cfg.k`` for this call (``"cfg"`` keeps it)."""
        k = self.cfg.k if k == "cfg" else k
        return MF.gate_topk(x, self.W_enc, self.b_enc, k, "relu", backend=self.backend)

    def decode(self, x: Tensor, acts: Tensor, indices: Tensor) -> Tensor:
        """y [..., d_out] from the (acts, indices) of :meth:`encode`; x [..., d_in] feeds the
        skip connection (same signature as :meth:`molt_kernels.MOLT.decode`)."""
        check_x(x, self.cfg.d_in)
        return transcoder_decode(
            x, acts, indices, self.W_dec, self.b_dec, self.W_skip, self.backend
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> y [..., d_out], in x's dtype."""
        acts, indices = self.encode(x)
        return self.decode(x, acts, indices)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, d_out={c.d_out}, n_features={c.n_features}, k={c.k}, "
            f"skip={c.skip}, backend={self.backend!r}"
        )
