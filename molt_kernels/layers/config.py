"""Configuration of a MOLT layer and the MOLT paper's rank allocation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..ops.validation import check_activation, check_k, check_positive_float, check_positive_int

PAPER_MAX_RANK = 512
PAPER_BUCKETS = 5


def paper_rank_counts(
    n: int, max_rank: int = PAPER_MAX_RANK, n_buckets: int = PAPER_BUCKETS
) -> dict[int, int]:
    """The MOLT paper's allocation: N transforms of rank 512, 2N of 256, ... 16N of 32.

    Each bucket halves the rank and doubles the count, so every bucket holds the same number of
    rank-one "feature equivalents" (N * max_rank). Buckets whose rank would fall below 1 are
    dropped.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    counts: dict[int, int] = {}
    for i in range(n_buckets):
        rank = max_rank >> i
        if rank < 1:
            break
        counts[rank] = n << i
    return counts


def scaled_max_rank(d: int) -> int:
    """Largest power of two <= min(d, 512): the top rank of the paper allocation for width d."""
    return min(PAPER_MAX_RANK, 1 << (max(d, 1).bit_length() - 1))


@dataclass(frozen=True)
class MOLTConfig:
    """Shape and gating of a MOLT layer.

    Transform ids are global and bucket-major: bucket ``b`` holds ids
    ``bucket_offsets[b] : bucket_offsets[b + 1]``, buckets in ``rank_counts`` order.

    Args:
        d_in: input width.
        rank_counts: ``{rank: number of transforms}``, in bucket order.
        k: transforms kept per token by the top-k; ``None`` keeps every transform whose activation
            is non-zero (gating by the activation alone, as the MOLT paper trains).
        d_out: output width (defaults to ``d_in``).
        activation: ``"relu"``, ``"jumprelu"`` (learned per-transform thresholds, trained with a
            straight-through estimator) or ``"identity"``.
        jumprelu_bandwidth: width of the rectangle kernel of the threshold's straight-through
            estimator.
        init_l0: transforms expected to open per token at initialisation (defaults to ``k``, or
            ``min(T, 32)`` when ``k`` is None).
        init_scale: scale of the initial output of one transform relative to its input.
        scale_gate_by_norm: gate on n_t * pre_t, n_t = ||U_t V_t||_F: the activation (a jumprelu
            threshold compares with n_t * pre_t) and the top-k see the scaled pre-activations,
            and each kept gate is divided by n_t again (0 for a transform with n_t = 0). The
            ranking, and so the selection, follows n_t * pre_t rather than pre_t. n_t is a
            constant of the backward: the exact derivative through it is zero, since
            act(n p) / n is p on open gates. OpenMOSS's ``sparsity_include_decoder_norm``.
        standardize: the layer holds buffers ``input_mean``, ``input_std`` [d_in] and
            ``output_mean``, ``output_std`` [d_out] (identity at initialisation) and computes
            y = layer((x - input_mean) / input_std) * output_std + output_mean: the gate and the
            transforms both read the standardised x. crosslayer-transcoder's standardisers.
        decoder_bias: whether the layer has ``b_dec``; without it y has no bias term.
    """

    d_in: int
    rank_counts: Mapping[int, int]
    k: int | None
    d_out: int | None = None
    activation: str = "relu"
    jumprelu_bandwidth: float = 1e-3
    init_l0: float | None = None
    init_scale: float = 0.1
    scale_gate_by_norm: bool = False
    standardize: bool = False
    decoder_bias: bool = True
    ranks: tuple[int, ...] = field(init=False, repr=False)
    counts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive_int("d_in", self.d_in)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        check_positive_int("d_out", self.d_out)
        if not isinstance(self.rank_counts, Mapping) or len(self.rank_counts) == 0:
            raise ValueError(
                f"rank_counts must be a non-empty mapping {{rank: count}}, got {self.rank_counts!r}"
            )
        for rank, count in self.rank_counts.items():
            check_positive_int("rank_counts rank", rank)
            check_positive_int(f"rank_counts[{rank}] (transform count)", count)
        object.__setattr__(self, "rank_counts", dict(self.rank_counts))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.rank_counts))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.rank_counts.values()))
        check_k(self.k, self.n_transforms, "n_transforms")
        check_activation(self.activation)
        check_positive_float("jumprelu_bandwidth", self.jumprelu_bandwidth)
        if self.init_l0 is not None:
            check_positive_float("init_l0", self.init_l0)
            if not self.init_l0 <= self.n_transforms:
                raise ValueError(
                    f"init_l0 must be in (0, n_transforms={self.n_transforms}], got {self.init_l0}"
                )
        check_positive_float("init_scale", self.init_scale)
        for name in ("scale_gate_by_norm", "standardize", "decoder_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def paper(
        cls, d_in: int, n: int, k: int | None, *, n_buckets: int = PAPER_BUCKETS, **kwargs: Any
    ) -> MOLTConfig:
        """The paper allocation (N x 512 ... 16N x 32), with ranks scaled down when d < 512."""
        d_out = kwargs.get("d_out") or d_in
        max_rank = scaled_max_rank(min(d_in, d_out))
        return cls(d_in=d_in, rank_counts=paper_rank_counts(n, max_rank, n_buckets), k=k, **kwargs)

    @property
    def n_transforms(self) -> int:
        return sum(self.counts)

    @property
    def n_buckets(self) -> int:
        return len(self.ranks)

    @property
    def bucket_offsets(self) -> tuple[int, ...]:
        """First transform id of each bucket, plus the total: length n_buckets + 1."""
        offsets = [0]
        for count in self.counts:
            offsets.append(offsets[-1] + count)
        return tuple(offsets)

    @property
    def total_rank(self) -> int:
        return sum(r * c for r, c in zip(self.ranks, self.counts))

    @property
    def expected_l0_at_init(self) -> float:
        if self.init_l0 is not None:
            return float(self.init_l0)
        return float(self.k if self.k is not None else min(self.n_transforms, 32))

    def n_parameters(self) -> int:
        """T*(d_in+1) gate + sum(r_t)*(d_in+d_out) transforms (+ d_out bias) (+T thresholds).

        Standardisation statistics are buffers, not parameters."""
        t = self.n_transforms
        n = t * (self.d_in + 1) + self.total_rank * (self.d_in + self.d_out)
        n += self.d_out if self.decoder_bias else 0
        return n + (t if self.activation == "jumprelu" else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["ranks"], d["counts"]
        # JSON objects only have string keys and we need the bucket order kept: store pairs.
        d["rank_counts"] = [[r, c] for r, c in self.rank_counts.items()]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MOLTConfig:
        if not isinstance(d, Mapping):
            raise TypeError(f"a MOLTConfig dict must be a mapping, got {type(d).__name__}")
        d = dict(d)
        rc = d.get("rank_counts")
        if isinstance(rc, list):
            # JSON form: [[rank, count], ...] in bucket order; values are checked, not coerced.
            if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in rc):
                raise ValueError(f"rank_counts must be a list of [rank, count] pairs, got {rc!r}")
            d["rank_counts"] = {r: c for r, c in rc}
            if len(d["rank_counts"]) != len(rc):
                raise ValueError(f"rank_counts repeats a rank: {rc!r}")
        known = {f for f in cls.__dataclass_fields__ if f not in ("ranks", "counts")}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MOLTConfig fields: {sorted(unknown)}")
        return cls(**d)


def normal_quantile(p: float) -> float:
    """Inverse standard-normal CDF, by bisection on erf (used once, at initialisation)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
