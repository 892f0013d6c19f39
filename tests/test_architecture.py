"""The package's layering (ARCHITECTURE.md): tools -> interp -> layers -> ops, no import cycles,
and the old module paths still importable with a DeprecationWarning."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import molt_kernels
from molt_kernels._compat import MOVED

PACKAGE = Path(molt_kernels.__file__).parent
# Higher imports lower, never the reverse. The package root (__init__, __main__, _compat) sits on
# top: it re-exports the public API and dispatches the CLI.
LAYERS = {"ops": 0, "layers": 1, "interp": 2, "interop": 2, "tools": 3}
ROOT_LEVEL = 4


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported molt_kernels module, at module level?) for every import in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("molt_kernels"):
                found.append((t, id(node) in top_level))
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], ROOT_LEVEL) if len(parts) > 1 else ROOT_LEVEL


def _existing(module: str) -> str | None:
    """The longest prefix of ``module`` that is a module file or package of ours."""
    parts = module.split(".")
    while parts:
        rel = Path(*parts[1:]) if len(parts) > 1 else Path()
        as_file, as_package = (PACKAGE / rel).with_suffix(".py"), PACKAGE / rel / "__init__.py"
        if as_file.is_file() or as_package.is_file():
            return ".".join(parts)
        parts.pop()
    return None


FILES = sorted(PACKAGE.rglob("*.py"))


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in FILES:
        src = _module_name(path)
        for target, _ in _imports(path):
            if target in MOVED or _existing(target) is None:
                wrong.append(f"{src} imports {target}, which is not a current module")
            elif _layer(target) > _layer(src):
                wrong.append(f"{src} (layer {_layer(src)}) imports {target} ({_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_kernel_code_imports_only_ops() -> None:
    for path in (PACKAGE / "ops").rglob("*.py"):
        for target, _ in _imports(path):
            assert target.startswith("molt_kernels.ops"), f"{path} imports {target}"


def test_no_import_cycles_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    for path in FILES:
        src = _module_name(path)
        deps = {_existing(t) for t, top in _imports(path) if top}
        graph[src] = {d for d in deps if d and d != src and not src.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_import_with_a_deprecation_warning(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is new
    assert any(
        issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught
    )
