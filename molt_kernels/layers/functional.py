"""Functional MOLT layer: the ops the modules are thin wrappers over.

Every function accepts any number of leading dims on ``x`` ([..., d_in]), validates its inputs
(clear errors naming the argument), resolves the backend and handles dtypes: bf16/fp16 inputs on
the CPU are computed in fp32 and returned in the input dtype. On the reference and torch backends
parameters are cast to the compute dtype (differentiably, so gradients reach them in their own
dtype); the triton kernels read fp32 master weights under half x as they are, casting each tile in
registers, and return their gradients in fp32 (``ops.dtypes.kernel_weight_dtype``).

Precision: ``allow_tf32`` lets the triton kernels' fp32 dots use TF32. ``None`` (the default)
follows torch's own switch for fp32 CUDA matmuls (``torch.set_float32_matmul_precision("high")``
or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``), which also governs the matmuls of the
reference and torch backends and of the triton gate's dense backward; off by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.dtypes import (
    accumulator_dtype,
    compute_dtype,
    default_allow_tf32,
    kernel_weight_dtype,
)
from ..ops.gate_topk import gate_topk_backend
from ..ops.lowrank_mixture import lowrank_mixture_backend
from ..ops.validation import (
    check_gate_activation,
    check_indices,
    check_k,
    check_positive_float,
    check_tensor,
    check_x,
)
from .backend import resolve_backend


def _resolve_allow_tf32(allow_tf32: bool | None) -> bool:
    """``allow_tf32`` itself, or torch's switch for None (read per call, as torch's matmuls do)."""
    if allow_tf32 is None:
        return default_allow_tf32()
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    return allow_tf32


def _check_deterministic(deterministic: bool) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def _kernel_weights(weights: Sequence[Tensor], x_dtype: torch.dtype) -> list[Tensor]:
    """The buckets' weights as the triton decode reads them: as they are when they share a dtype
    the kernels read (x's, or fp32 under half x), else copied to x's dtype (one kernel argument
    type for all buckets)."""
    dtypes = {w.dtype for w in weights}
    dtype = kernel_weight_dtype(dtypes.pop(), x_dtype) if len(dtypes) == 1 else x_dtype
    return [w.to(dtype) for w in weights]


def _check_gate_args(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str,
    log_threshold: Tensor | None,
    bandwidth: float,
    norm_scale: Tensor | None,
) -> int:
    if not isinstance(W_gate, Tensor) or W_gate.dim() != 2:
        raise ValueError("W_gate must be a 2-d tensor [T, d_in]")
    n_transforms, d_in = W_gate.shape
    check_x(x, d_in)
    check_tensor("W_gate", W_gate, (n_transforms, d_in), x.device)
    check_tensor("b_gate", b_gate, (n_transforms,), x.device)
    check_k(k, n_transforms)
    check_gate_activation(activation, log_threshold)
    if activation == "jumprelu":
        check_tensor("log_threshold", log_threshold, (n_transforms,), x.device)
    if norm_scale is not None:
        check_tensor("norm_scale", norm_scale, (n_transforms,), x.device)
    check_positive_float("bandwidth", bandwidth)
    return n_transforms


def gate_topk(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    k: int | None,
    activation: str = "relu",
    log_threshold: Tensor | None = None,
    bandwidth: float = 1e-3,
    backend: str | None = None,
    norm_scale: Tensor | None = None,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Gates and indices of the k largest act(x W_gate^T + b_gate) per token.

    x [..., d_in]; W_gate [T, d_in]; b_gate [T]; log_threshold [T] (jumprelu only).
    Returns gates [..., k] (fp32 for half inputs, else x's dtype) and indices [..., k] int64;
    ties go to the lower transform id. ``k=None`` returns all T activations.

    ``norm_scale`` [T] (n_t >= 0, e.g. ||U_t V_t||_F): rank and cut act(n_t pre_t) instead, and
    return act(n_t pre_t) / n_t (0 where n_t = 0). It is a constant of the backward (detached).
    ``allow_tf32``: fp32 gate dots of the triton backend in TF32 (None: torch's switch).
    """
    _check_gate_args(x, W_gate, b_gate, k, activation, log_threshold, bandwidth, norm_scale)
    allow_tf32 = _resolve_allow_tf32(allow_tf32)
    backend = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    W, b = W_gate, b_gate
    if norm_scale is not None:
        # n_t (x . W_t + b_t) = x . (n_t W_t) + n_t b_t: the scaled gate is the plain gate of the
        # scaled weights, on every backend and in the fused kernel alike. The extra [T, d_in]
        # product is 1/tokens of the gate matmul. In the accumulation dtype: n_t and the scaled
        # weights rounded to bf16 would move the cut and every gate by up to 2^-9 relative.
        scale = norm_scale.detach().to(accumulator_dtype(x.dtype))
        W, b = W.to(scale.dtype) * scale[:, None], b.to(scale.dtype) * scale
    if backend != "triton":
        # Triton kernels read half inputs as they are and accumulate in fp32 themselves.
        dtype = accumulator_dtype(x.dtype)
        x2, W, b = x2.to(dtype), W.to(dtype), b.to(dtype)
        # theta = exp(log_threshold) in the accumulation dtype too: exp of a bf16 threshold
        # rounded to bf16 would move the cut by up to 2^-9 relative.
        if log_threshold is not None:
            log_threshold = log_threshold.to(dtype)
    gate = gate_topk_backend(backend, allow_tf32)
    gates, indices = gate(x2, W, b, k, activation, log_threshold, bandwidth)
    if norm_scale is not None:
        # A transform with n_t = 0 has pre = act(0) = 0: divide it by 1 instead of 0.
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).to(gates.dtype)
        gates = gates / divisor[indices]
    return gates.reshape(*lead, gates.shape[-1]), indices.reshape(*lead, indices.shape[-1])


def _check_decode_args(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor | None,
) -> int:
    """Checks the decode's arguments; returns T, the transform count of U and V."""
    if len(U) == 0 or len(U) != len(V):
        raise ValueError(
            f"U and V must be equal-length non-empty sequences, got {len(U)}, {len(V)}"
        )
    for name, seq, layout in (("U", U, "[n_b, d_out, r_b]"), ("V", V, "[n_b, r_b, d_in]")):
        for b, t in enumerate(seq):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(f"{name}[{b}] must be a 3-d tensor {layout}")
    d_in, d_out = V[0].shape[2], U[0].shape[1]
    check_x(x, d_in)
    n_transforms = 0
    for b, (u, v) in enumerate(zip(U, V)):
        n, r = v.shape[0], v.shape[1]
        check_tensor(f"V[{b}]", v, (n, r, d_in), x.device)
        check_tensor(f"U[{b}]", u, (n, d_out, r), x.device)
        n_transforms += n
    if b_dec is not None:
        check_tensor("b_dec", b_dec, (d_out,), x.device)
    check_indices(x, gates, "gates", indices, n_transforms, "T", distinct=True)
    if gates.shape[-1] == 0:
        raise ValueError("gates and indices must have k >= 1 slots per token, got k=0")
    return n_transforms


def lowrank_mixture(
    x: Tensor,
    gates: Tensor,
    indices: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor | None,
    backend: str | None = None,
    allow_tf32: bool | None = None,
    deterministic: bool = True,
) -> Tensor:
    """y [..., d_out] = sum over (t in indices, gate != 0) gate * U_t (V_t x) + b_dec.

    x [..., d_in]; gates [..., k] float; indices [..., k] int64, distinct per token;
    U[b] [n_b, d_out, r_b]; V[b] [n_b, r_b, d_in]; b_dec [d_out] or None (no bias). Returns
    x's dtype. ``allow_tf32``: fp32 dots of the triton backend in TF32 (None: torch's switch).
    ``deterministic=False``: the triton backend sums y and dx with fp32 atomics (faster by the
    cost model; the rounding varies from run to run). Every backend is bitwise deterministic
    by default.
    """
    _check_decode_args(x, gates, indices, U, V, b_dec)
    allow_tf32 = _resolve_allow_tf32(allow_tf32)
    _check_deterministic(deterministic)
    backend = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gates.reshape(-1, gates.shape[-1])
    i2 = indices.reshape(-1, indices.shape[-1])
    if backend == "triton":
        # Kernels take x in its dtype, the gates in fp32 (fp64 stays fp64) and fp32 master
        # weights under half x as they are (no copy per call; each tile is cast in registers).
        dtype = x.dtype
        g2 = g2.to(accumulator_dtype(dtype))
        Us, Vs = _kernel_weights(U, dtype), _kernel_weights(V, dtype)
        bias = b_dec.to(kernel_weight_dtype(b_dec.dtype, dtype)) if b_dec is not None else None
    else:
        dtype = compute_dtype(x)
        g2 = g2.to(dtype)
        Us, Vs = [u.to(dtype) for u in U], [v.to(dtype) for v in V]
        bias = b_dec.to(dtype) if b_dec is not None else None
    x2 = x2.to(dtype)
    # No bias: the ops add zeros (exact), so they keep one signature.
    if bias is None:
        bias = x2.new_zeros(Us[0].shape[1])
    y = lowrank_mixture_backend(backend, allow_tf32, deterministic)(x2, g2, i2, Us, Vs, bias)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def molt(
    x: Tensor,
    W_gate: Tensor,
    b_gate: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    b_dec: Tensor | None,
    k: int | None,
    activation: str = "relu",
    log_threshold: Tensor | None = None,
    bandwidth: float = 1e-3,
    backend: str | None = None,
    norm_scale: Tensor | None = None,
    allow_tf32: bool | None = None,
    deterministic: bool = True,
) -> Tensor:
    """The whole MOLT layer: gate_topk then lowrank_mixture. x [..., d_in] -> y [..., d_out].

    ``allow_tf32``: fp32 dots of the triton backend in TF32, gate and decode (None: torch's
    switch, see the module docstring); ``deterministic``: see :func:`lowrank_mixture`."""
    n_gate = _check_gate_args(
        x, W_gate, b_gate, k, activation, log_threshold, bandwidth, norm_scale
    )
    n_decode = sum(v.shape[0] for v in V if isinstance(v, Tensor) and v.dim() == 3)
    if n_gate != n_decode:
        raise ValueError(
            f"W_gate has {n_gate} rows but U and V hold {n_decode} transforms: they must match"
        )
    backend = resolve_backend(backend, x.device)
    allow_tf32 = _resolve_allow_tf32(allow_tf32)
    gates, indices = gate_topk(
        x, W_gate, b_gate, k, activation, log_threshold, bandwidth, backend, norm_scale,
        allow_tf32,
    )
    return lowrank_mixture(x, gates, indices, U, V, b_dec, backend, allow_tf32, deterministic)
