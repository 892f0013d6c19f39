"""Old module paths (before the layers / interp / tools split) kept importable for one release.

``import molt_kernels.config`` and friends still work: an import hook maps each old name to its
new module and warns once with a DeprecationWarning naming the new path. Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "molt_kernels.backend": "molt_kernels.layers.backend",
    "molt_kernels.config": "molt_kernels.layers.config",
    "molt_kernels.functional": "molt_kernels.layers.functional",
    "molt_kernels.io": "molt_kernels.layers.io",
    "molt_kernels.modules": "molt_kernels.layers.molt",
    "molt_kernels.transcoder": "molt_kernels.layers.transcoder",
    "molt_kernels.flops": "molt_kernels.layers.flops",
    "molt_kernels.capture": "molt_kernels.interp.capture",
    "molt_kernels.data": "molt_kernels.interp.data",
    "molt_kernels.metrics": "molt_kernels.interp.metrics",
    "molt_kernels.models": "molt_kernels.interp.models",
    "molt_kernels.models.minilm": "molt_kernels.interp.models.minilm",
    "molt_kernels.replace": "molt_kernels.interp.replace",
    "molt_kernels.train": "molt_kernels.interp.train",
    "molt_kernels.bench": "molt_kernels.tools.bench",
    "molt_kernels.bench_gate": "molt_kernels.tools.bench.gate",
    "molt_kernels.gpu_report": "molt_kernels.tools.gpu_report",
    "molt_kernels.testing": "molt_kernels.tools.testing",
    "molt_kernels.verify": "molt_kernels.tools.verify",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new_name}; the old path goes away in molt_kernels 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new_name)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed; importing under the old name only aliases it."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
