"""Whether Triton is importable here, and whether it runs under its CPU interpreter."""

from __future__ import annotations

import importlib.util
import os


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels execute on the CPU with numpy (how the tests run)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
