"""molt_kernels: fast sparse MOLT layers (mixtures of low-rank transforms) for interpretability.

Public API: :class:`MOLTConfig`, :func:`paper_rank_counts`, :class:`MOLT`, the functional ops in
:mod:`molt_kernels.functional`, and backend selection in :mod:`molt_kernels.backend`.
"""

from .backend import BACKENDS, available_backends, resolve_backend
from .config import MOLTConfig, paper_rank_counts
from .functional import gate_topk, lowrank_mixture, molt
from .modules import MOLT

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
