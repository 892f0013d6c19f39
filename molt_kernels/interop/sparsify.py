"""EleutherAI sparsify transcoders: ``cfg.json`` + ``sae.safetensors``.

Their ``SparseCoder`` with ``transcode: true``, as ``save_to_disk`` writes it and
``load_from_disk`` reads it (strictly, in the stored dtype):

- cfg.json: the SparseCoderConfig fields (activation, expansion_factor, normalize_decoder,
  num_latents, k, multi_topk, skip_connection, transcode) plus ``d_in``; F = num_latents, or
  d_in * expansion_factor when num_latents is 0;
- tensors ``encoder.weight`` [F, d_in], ``encoder.bias`` [F], ``W_dec`` [F, d_in], ``b_dec`` [d_in],
  and ``W_skip`` [d_in, d_in] with ``skip_connection``: the layouts of our TopKTranscoder's
  ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``W_skip``. Their d_out is always d_in.

Forward (transcode): top-k of relu(x W^T + b), y = sum acts W_dec[idx] + b_dec (+ x W_skip^T): our
TopKTranscoder. Refused: sparse autoencoders (``transcode: false`` subtracts b_dec from x before
encoding) and the ``groupmax`` activation. ``normalize_decoder`` and ``multi_topk`` only shape
training and are ignored on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..layers.transcoder import TopKTranscoder, TranscoderConfig
from ._files import (
    check_keys,
    check_shape,
    common_dtype,
    field,
    positive_int,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
# Our TopKTranscoder's parameter of each of their tensors.
PARAMETERS = {
    "encoder.weight": "W_enc",
    "encoder.bias": "b_enc",
    "W_dec": "W_dec",
    "b_dec": "b_dec",
    "W_skip": "W_skip",
}


def load_sparsify(path: str | Path, backend: str | None = None) -> TopKTranscoder:
    """Read a sparsify transcoder directory into a :class:`TopKTranscoder` (stored dtype)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    source = str(cfg_file)
    config = read_json(cfg_file)
    d_in = positive_int(source, "d_in", config.get("d_in"))
    if not field(source, config, "transcode", bool, False):
        raise ValueError(f"{source}: transcode is false: a sparse autoencoder, not a transcoder")
    activation = field(source, config, "activation", str, "topk")
    if activation != "topk":
        raise ValueError(f"{source}: activation {activation!r} is not supported (only 'topk')")
    k = positive_int(source, "k", field(source, config, "k", int, 32))
    n_features = field(source, config, "num_latents", int, 0) or d_in * positive_int(
        source, "expansion_factor", field(source, config, "expansion_factor", int, 32)
    )
    skip = field(source, config, "skip_connection", bool, False)
    try:
        cfg = TranscoderConfig(d_in=d_in, n_features=n_features, k=k, skip=skip)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e

    weights_file = path / WEIGHTS_FILE
    source = str(weights_file)
    tensors = read_safetensors(weights_file)
    shapes = {
        "encoder.weight": (n_features, d_in),
        "encoder.bias": (n_features,),
        "W_dec": (n_features, d_in),
        "b_dec": (d_in,),
    }
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    check_keys(source, tensors, shapes)
    for name, shape in shapes.items():
        check_shape(source, name, tensors[name], shape)
    layer = TopKTranscoder(cfg, backend=backend, dtype=common_dtype(source, tensors.values()))
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(layer, PARAMETERS[name]).copy_(t)
    return layer


def save_sparsify(transcoder: TopKTranscoder, path: str | Path) -> Path:
    """Write ``transcoder`` as a sparsify transcoder directory (needs d_out == d_in)."""
    if not isinstance(transcoder, TopKTranscoder):
        raise TypeError(f"transcoder must be a TopKTranscoder, got {type(transcoder).__name__}")
    cfg = transcoder.cfg
    if cfg.d_out != cfg.d_in:
        raise ValueError(
            f"sparsify transcoders map d_in -> d_in; this one has d_in={cfg.d_in}, "
            f"d_out={cfg.d_out}"
        )
    config = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_features // cfg.d_in),
        # Training-time option of theirs; our decoder rows are not held at unit norm.
        "normalize_decoder": False,
        "num_latents": cfg.n_features,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": cfg.skip,
        "transcode": True,
        "d_in": cfg.d_in,
    }
    tensors = {
        name: getattr(transcoder, ours).detach()
        for name, ours in PARAMETERS.items()
        if getattr(transcoder, ours) is not None
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, tensors)
    write_json(path / CONFIG_FILE, config)
    return path
