"""Load, accelerate and export the MOLTs and transcoders that other libraries train.

- :func:`load_openmoss` / :func:`save_openmoss`: OpenMOSS Language-Model-SAEs MOLTs
  (``config.json`` + ``sae_weights.safetensors``).
- :func:`load_crosslayer_transcoder`: MOLTs of crosslayer-transcoder's MOLT branch (a Lightning
  ``.ckpt``; ``layer`` picks the standardisers' row).
- :func:`load_sparsify` / :func:`save_sparsify`: EleutherAI sparsify transcoders (``cfg.json`` +
  ``sae.safetensors``), as :class:`~molt_kernels.transcoder.TopKTranscoder`.

Loaders keep the stored dtype and check every tensor name and shape; each module's docstring
describes its format and how the peer's computation maps onto the layer's options.
"""

from .crosslayer_transcoder import load_crosslayer_transcoder
from .openmoss import load_openmoss, save_openmoss
from .sparsify import load_sparsify, save_sparsify

__all__ = [
    "load_crosslayer_transcoder",
    "load_openmoss",
    "load_sparsify",
    "save_openmoss",
    "save_sparsify",
]
