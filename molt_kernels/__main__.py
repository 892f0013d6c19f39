"""`python -m molt_kernels <command> [options]`: verify, bench, gpu-report, flops, convert, train,
study (``--help`` on each)."""

from __future__ import annotations

import sys

from molt_kernels.tools.subcommands import dispatch

COMMANDS = {
    "verify": ("molt_kernels.tools.verify", "check every backend against the float64 reference"),
    "bench": ("molt_kernels.tools.bench", "time / FLOPs / memory tables against the reference"),
    "gpu-report": ("molt_kernels.tools.gpu_report", "compile every Triton kernel for sm_80/sm_90"),
    "flops": ("molt_kernels.tools.flops", "parameters and FLOPs of MOLTs and matched transcoders"),
    "convert": ("molt_kernels.tools.convert", "OpenMOSS / crosslayer-transcoder / sparsify files"),
    "train": ("molt_kernels.tools.train", "train MOLTs / transcoders on a model's MLPs on the fly"),
    "study": ("molt_kernels.tools.study", "research studies (pareto, replacement-aware)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return dispatch("python -m molt_kernels", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
