"""Step schedules for training replacement layers: learning-rate warm-up and decay, the sparsity
coefficient's warm-up and k annealing. Pure functions of the step, so a resumed run recomputes
exactly the values an uninterrupted one used."""

from __future__ import annotations

import math

LR_DECAYS = ("constant", "linear", "cosine")


def linear_warmup(step: int, warmup_steps: int) -> float:
    """min(1, step / warmup_steps) for step >= 0 (1 from the start when warmup_steps is 0)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, decay: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from 1/warmup_steps at step 0), then ``decay`` from 1 to
    ``min_ratio`` at ``total_steps``: ``"constant"`` (no decay), ``"linear"`` or ``"cosine"``.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"decay must be one of {LR_DECAYS}, got {decay!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def annealed_k(step: int, k_start: int, k_end: int, anneal_steps: int) -> int:
    """k moved linearly from ``k_start`` at step 0 to ``k_end`` at ``anneal_steps``, rounded."""
    if k_start < 1 or k_end < 1:
        raise ValueError(f"k_start and k_end must be >= 1, got {k_start}, {k_end}")
    return round(k_start + (k_end - k_start) * linear_warmup(step, anneal_steps))
