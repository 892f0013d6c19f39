"""`python -m molt_kernels study <name> [options]`: research studies on real models.

Each study is a module under :mod:`molt_kernels.tools.studies` with a ``main(argv) -> int``;
``--help`` on a study lists its options.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

STUDIES = {
    "pareto": (
        "molt_kernels.tools.studies.pareto",
        "MOLT vs transcoder Pareto frontiers (FVU, Jacobian, FLOPs vs L0) on MiniLM MLPs",
    ),
}


def usage() -> str:
    lines = ["usage: python -m molt_kernels study <name> [options]", "", "studies:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in STUDIES.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STUDIES:
        print(f"unknown study {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(STUDIES[name][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
