"""`python -m molt_kernels study <name> [options]`: research studies on real models.

Each study is a module under :mod:`molt_kernels.tools.studies` with a ``main(argv) -> int``;
``--help`` on a study lists its options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .subcommands import dispatch

STUDIES = {
    "pareto": (
        "molt_kernels.tools.studies.pareto",
        "MOLT vs transcoder Pareto frontiers (FVU, Jacobian, FLOPs vs L0) on MiniLM MLPs",
    ),
    "replacement-aware": (
        "molt_kernels.tools.studies.replacement_aware",
        "post-hoc MOLTs vs replacement-aware training of a small GPT (CPU)",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return dispatch("python -m molt_kernels study", STUDIES, argv, noun="study", plural="studies")


if __name__ == "__main__":
    raise SystemExit(main())
