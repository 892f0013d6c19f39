"""``python -m molt_kernels bench``: argument parsing and the top-level runs."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...layers.flops import (
    matched_transcoder,
    molt_reference_cost,
)
from .contend import busy_processes
from .measure import (
    DEFAULT_MAX_RUN_SECONDS,
    DEFAULT_REPEATS,
    QUICK_REPEATS,
    RECORDED_ENV,
    CaseInfo,
    Result,
    Runner,
    synchronize,
    time_runs,
)
from .report import _case, _case_json, device_name, plot, render_report
from .workload import (
    GRID_D,
    GRID_K,
    GRID_N,
    GRID_TOKENS,
    MODES,
    QUICK,
    TRANSCODER,
    grid,
    native_backends,
)

# -- command line ------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        bad = [v for v in names if v not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="molt_kernels bench",
        description="Time, FLOP/s and peak memory of MOLT backends vs the naive reference and a "
        "parameter-matched TopK transcoder, forward and forward+backward.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="d=512, N=2, k=8, 4096 tokens (about a minute on a 2-core CPU)",
    )
    p.add_argument("--d", type=int_list, help=f"widths (default {GRID_D})")
    p.add_argument("--n", type=int_list, help=f"paper-allocation N (default {GRID_N})")
    p.add_argument("--k", type=int_list, help=f"top-k (default {GRID_K})")
    p.add_argument("--tokens", type=int_list, help=f"token counts (default {GRID_TOKENS})")
    p.add_argument(
        "--backends",
        type=_names(("reference", "torch", "triton")),
        help="MOLT backends (default: every one that runs natively here)",
    )
    p.add_argument("--no-transcoder", action="store_true", help="leave out the transcoder")
    p.add_argument("--modes", type=_names(MODES), default=MODES, help="forward,forward_backward")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default float32 on CPU (half matmuls are slow there), bfloat16 on CUDA",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs after the warm-up (default {DEFAULT_REPEATS}, "
        f"{QUICK_REPEATS} with --quick)",
    )
    p.add_argument(
        "--max-run-seconds",
        type=float,
        default=DEFAULT_MAX_RUN_SECONDS,
        help="skip runs predicted or found to take longer than this",
    )
    p.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    p.add_argument(
        "--render", type=Path, help="print (and --plot) a saved --json report; measure nothing"
    )
    p.add_argument("--plot", type=Path, help="draw time and FLOPs per token vs size (PNG)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--contend",
        type=int,
        default=0,
        metavar="N",
        help="run N busy processes (one spinning core each) beside the measurement, as on a "
        "shared machine; they are stopped afterwards",
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="time the gate alone (fused gated top-k vs F.linear + relu + torch.topk) over "
        "--t x --d x --k instead of the layer",
    )
    p.add_argument("--t", type=int_list, help="transform counts for --gate (default 1k,16k,64k)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or re-render a saved one) and print its tables; returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'molt_kernels[bench]'")
    if args.gate:
        return gate_main(parser, args)
    if args.render is not None:
        try:
            report = json.loads(args.render.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--render {args.render}: {e}")
        try:
            tables = render_report(report)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            parser.error(
                f"--render {args.render}: not a report written by bench --json "
                f"({type(e).__name__}: {e})"
            )
    else:
        report = measure(parser, args, argv)
        tables = render_report(report)
    print(tables)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    if args.plot is not None:
        plot([Result(**r) for r in report["results"]], args.plot)
    return 0


def device_and_dtype(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[torch.device, torch.dtype]:
    """--device (default: cuda when present) and --dtype (bf16 on CUDA, fp32 on the CPU)."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be a torch device such as cpu or cuda:0, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA"
            if torch.version.cuda is None
            else "torch sees no CUDA device"
        )
        # One line, no usage block: the arguments are fine, the machine is not.
        print(
            f"{parser.prog}: error: --device {name}: {why} (torch {torch.__version__})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return device, dtype


def measure(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, Any]:
    """Run every selected (config, implementation, mode); the report as a JSON-able dict."""
    device, dtype = device_and_dtype(parser, args)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    native = native_backends(device)
    backends = args.backends or native
    missing = [b for b in backends if b not in native]
    if missing:
        parser.error(f"backend(s) {missing} do not run natively on {device.type}")
    impls = [b for b in native if b in backends] + ([] if args.no_transcoder else [TRANSCODER])

    base = QUICK if args.quick else {"d": GRID_D, "n": GRID_N, "k": GRID_K, "tokens": GRID_TOKENS}
    cases = grid(*(getattr(args, dim) or base[dim] for dim in ("d", "n", "k", "tokens")))
    infos = []
    for case in cases:
        reason = case.invalid_reason()
        cfg = None if reason else case.molt_config()
        tcfg = None if reason else matched_transcoder(cfg)
        infos.append(CaseInfo(case, cfg, tcfg, skipped=reason))
    todo = [i for i in infos if i.skipped is None]
    # Smallest first, so that each prediction uses the rate of a smaller run of the same kind.
    todo.sort(key=lambda i: molt_reference_cost(i.cfg).forward * i.case.tokens)

    from tqdm import tqdm

    if args.contend < 0:
        parser.error("--contend must be >= 0")
    load_before = _load_average()
    results: list[Result] = []
    total = len(todo) * len(impls) * len(args.modes)
    with (
        busy_processes(args.contend),
        tqdm(total=total, desc="bench", file=sys.stderr, disable=args.no_progress) as bar,
    ):
        runner = Runner(args, device, dtype)
        for info in todo:
            bar.set_postfix_str(info.case.name)
            results += runner.run_case(info, impls, bar)
        load_during = _load_average()
    order = {i.case: n for n, i in enumerate(infos)}
    results.sort(key=lambda r: (order[_case(r)], impls.index(r.impl)))
    return {
        "command": "python -m molt_kernels bench " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "dense_matmul": runner.matmul,
        "cost_model_gpu": runner.model_gpu,
        # Other processes' load skews CPU timings; allocator settings change them (see RESULTS.md).
        "load_average": {"before": load_before, "after": load_during},
        "contend": args.contend,
        "environment": {name: os.environ.get(name) for name in RECORDED_ENV},
        "impls": impls,
        "cases": [_case_json(i) for i in infos],
        "results": [asdict(r) for r in results],
    }


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def gate_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`bench --gate`: the gate table (see :mod:`molt_kernels.tools.bench.gate`)."""
    from . import gate as bench_gate

    device, dtype = device_and_dtype(parser, args)
    repeats = args.repeats or DEFAULT_REPEATS
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def median_seconds(step: Callable[[], None]) -> float:
        step()  # warm-up
        synchronize(device)
        return statistics.median(time_runs(step, device, repeats))

    tokens = args.tokens[0] if args.tokens else None
    rows, table = bench_gate.gate_table(
        device,
        dtype,
        bench_gate.timed_impls(native_backends(device)),
        median_seconds,
        args.t or bench_gate.GRID_T,
        args.d or bench_gate.GRID_D,
        args.k or bench_gate.GRID_K,
        tokens,
    )
    print(
        f"# gate: {device_name(device)}, {str(dtype).removeprefix('torch.')}, torch "
        f"{torch.__version__}, median of {repeats}"
    )
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gate": rows}, indent=1) + "\n")
    return 0
