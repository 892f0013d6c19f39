"""Building the csrc/ extensions on first use, shared by their loaders (routing/cuda.py,
lowrank_mixture/cpu.py)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# molt_kernels/ops/extension.py -> molt_kernels/csrc (a link to the checkout's csrc/, or copies
# of the sources in a wheel).
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def missing_sources(sources: Sequence[str]) -> str | None:
    """Why the sources cannot be found, or None when they all are under :data:`CSRC`."""
    missing = [name for name in sources if not (CSRC / name).is_file()]
    if missing:
        return f"sources {missing} not found under {CSRC}: reinstall molt_kernels"
    return None


def build(
    name: str, sources: Sequence[str], log: logging.Logger, fallback: str, **flags: Any
) -> bool:
    """Compile (or load torch's cached build of) ``sources`` as ``name``; True on success.

    The build directory is named after ``name`` and a hash of the sources, so two installs of
    different versions on one machine (or two checkouts) keep separate cached builds instead of
    rebuilding over each other and loading a build that lacks an op.

    A failure is logged as a warning naming ``fallback``, the implementation used instead.
    ``flags`` go to ``torch.utils.cpp_extension.load``.
    """
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(b"".join((CSRC / s).read_bytes() for s in sources)).hexdigest()
    try:
        load(
            name=f"{name}_{digest[:12]}",
            sources=[str(CSRC / s) for s in sources],
            is_python_module=False,
            **flags,
        )
    except Exception as exc:  # any build failure means: use the fallback
        log.warning("building %s failed, using %s: %s", name, fallback, exc)
        return False
    return True
