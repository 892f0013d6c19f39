"""molt_kernels: fast sparse MOLT layers (mixtures of low-rank transforms) for interpretability.

Public API: :class:`MOLTConfig`, :func:`paper_rank_counts`, :class:`MOLT`, the functional ops in
:mod:`molt_kernels.layers.functional`, and backend selection in :mod:`molt_kernels.layers.backend`.
The package has four layers, each importing only those below it (ARCHITECTURE.md):
``tools`` (CLI) -> ``interp`` (interpretability tooling) -> ``layers`` -> ``ops`` (kernels).
"""

from . import _compat
from .layers import (
    BACKENDS,
    MOLT,
    MOLTConfig,
    available_backends,
    gate_topk,
    lowrank_mixture,
    molt,
    paper_rank_counts,
    resolve_backend,
)

_compat.install()

__all__ = [
    "BACKENDS",
    "MOLT",
    "MOLTConfig",
    "available_backends",
    "gate_topk",
    "lowrank_mixture",
    "molt",
    "paper_rank_counts",
    "resolve_backend",
]
__version__ = "0.1.0"
