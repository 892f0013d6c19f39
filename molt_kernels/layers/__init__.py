"""The layers: MOLT and TopK transcoder modules, their configs, the functional ops they are thin
wrappers over, backend choice, storage and FLOP accounting. Imports only ``molt_kernels.ops``."""

from .backend import BACKENDS, available_backends, resolve_backend
from .config import MOLTConfig, paper_rank_counts
from .functional import gate_topk, lowrank_mixture, molt
from .molt import MOLT
from .transcoder import TopKTranscoder, TranscoderConfig

__all__ = [
    "BACKENDS",
    "MOLT",
    "MOLTConfig",
    "TopKTranscoder",
    "TranscoderConfig",
    "available_backends",
    "gate_topk",
    "lowrank_mixture",
    "molt",
    "paper_rank_counts",
    "resolve_backend",
]
