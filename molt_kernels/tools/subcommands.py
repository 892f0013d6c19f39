"""Dispatch ``<prog> <name> [options]`` to the ``main(argv) -> int`` of a module named in a table
(the top-level ``python -m molt_kernels`` and ``python -m molt_kernels study`` share it)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence

Table = Mapping[str, tuple[str, str]]
"""name -> (module with a ``main(argv) -> int``, one-line help)."""


def usage(prog: str, table: Table, noun: str = "command", plural: str = "commands") -> str:
    lines = [f"usage: {prog} <{noun}> [options]", "", f"{plural}:"]
    width = max(map(len, table), default=0) + 2
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in table.items()]
    return "\n".join(lines)


def dispatch(
    prog: str, table: Table, argv: Sequence[str], noun: str = "command", plural: str = "commands"
) -> int:
    """Run ``table[argv[0]]``'s ``main(argv[1:])``. No name or -h/--help print the usage (exit 2
    and 0); an unknown name prints it to stderr and returns 2."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, table, noun, plural))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"unknown {noun} {name!r}\n\n{usage(prog, table, noun, plural)}", file=sys.stderr)
        return 2
    return importlib.import_module(table[name][0]).main(rest)
