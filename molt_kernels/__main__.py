"""`python -m molt_kernels <command> [options]`: verify, bench, gpu-report, flops, convert, study."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "verify": ("molt_kernels.tools.verify", "check every backend against the float64 reference"),
    "bench": ("molt_kernels.tools.bench", "time / FLOPs / memory tables against the reference"),
    "gpu-report": ("molt_kernels.tools.gpu_report", "compile every Triton kernel for sm_80/sm_90"),
    "flops": ("molt_kernels.tools.flops", "parameters and FLOPs of MOLTs and matched transcoders"),
    "convert": ("molt_kernels.tools.convert", "OpenMOSS / crosslayer-transcoder / sparsify files"),
    "study": ("molt_kernels.tools.study", "research studies on real models (pareto)"),
}


def usage() -> str:
    lines = ["usage: python -m molt_kernels <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
