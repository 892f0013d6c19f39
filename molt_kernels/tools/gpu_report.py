"""Compile every Triton kernel of the package for real GPU targets, without a GPU, and check it.

``python -m molt_kernels gpu-report --arch sm_80,sm_90`` builds each (kernel, launch config) for
each target with ``triton.compile`` (PTX and cubin need no device), reads the resource usage
with the ``cuobjdump`` that ships inside the triton wheel and the spill counts from ptxas' log, and
prints one row per (kernel, config, arch), with the tensor-core instructions its PTX uses
(``mma`` column: ``wgmma.bf16``, ``mma.tf32``, ...). It exits non-zero when any kernel fails to
compile, spills to local memory, needs more shared memory than the target allows per block, or
when an sm_90 build whose dot tile has at least 64 rows of half or tf32 inputs lacks wgmma
(``WGMMA_MIN_ROWS``: Hopper's mma.sync path runs at about half its wgmma rate).

The kernels come from :func:`molt_kernels.ops.registry.collect_builds`: each op folder's
``builds.py`` lists one :class:`~molt_kernels.ops.registry.KernelBuild` per (kernel, config) its
launch code can use.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..ops.configs import COMBINES
from ..ops.registry import KernelBuild, collect_builds

# Opt-in maximum of shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), which is
# what Triton's launcher compares ``metadata.shared`` against.
SHARED_MEM_LIMITS: dict[str, int] = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
}

# Dots of these operand types with at least this many rows per tile must use wgmma on sm_90
# (one warpgroup of 4 warps owns 64 rows, so num_warps must be a multiple of 4).
WGMMA_INPUTS = ("bf16", "fp16", "tf32")
WGMMA_MIN_ROWS = 64
# A tensor-core instruction's shape and types in PTX, e.g.
# "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" or
# "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32": (instruction, operand A type).
_MMA_PTX = re.compile(r"\b(wgmma|mma)(?:\.mma_async)?\.sync\.aligned\.m\d+n\d+k\d+"
                      r"(?:\.row\.col)?\.\w+\.(\w+)\.")


@dataclass(frozen=True)
class ReportRow:
    """Resource usage of one build on one target; ``None`` where it is unknown."""

    kernel: str
    config: str
    arch: str                           # "sm_90"
    num_warps: int
    num_stages: int
    registers: int | None = None        # per thread
    shared: int | None = None           # bytes, dynamic: what Triton launches with
    static_shared: int | None = None    # bytes, static in the cubin (ptxas' 1 KiB on sm_90)
    stack: int | None = None            # bytes per thread of stack frame (where spills go)
    local: int | None = None            # bytes per thread of local memory
    spill_stores: int | None = None     # bytes, from ptxas' log
    spill_loads: int | None = None
    wgmma: bool | None = None           # wgmma in the PTX (Hopper's async MMA; sm_90 only)
    mma: str | None = None              # tensor-core instructions in the PTX: "wgmma.bf16", ...;
                                        # "" for none (FMA units only)
    dot_rows: int = 0                   # the build's dot tile rows and operand type (KernelBuild)
    dot_input: str = ""
    error: str | None = None            # compile failure, first line


def config_family(arch: str) -> str:
    """The launch-config family of a target (``ops.configs.arch_of``): sm_90 from 9.0 up."""
    return "sm_90" if int(arch.removeprefix("sm_")) >= 90 else "sm_80"


def check_limits(row: ReportRow) -> list[str]:
    """Problems with ``row``: compile failure, any local memory or spill, shared memory too big,
    a large half/tf32 dot on sm_90 without wgmma.

    The shared memory rule is Triton's launch check: dynamic ``shared`` against the opt-in maximum.
    """
    if row.error is not None:
        return [f"compile failed: {row.error}"]
    problems = []
    spill = {
        "stack": row.stack,
        "local": row.local,
        "stores": row.spill_stores,
        "loads": row.spill_loads,
    }
    if any(spill.values()):
        problems.append("spill: " + ", ".join(f"{k}={v}" for k, v in spill.items() if v))
    limit = SHARED_MEM_LIMITS[row.arch]
    if row.shared is not None and row.shared > limit:
        problems.append(f"shared memory {row.shared} B > {row.arch} limit {limit} B")
    if (row.arch == "sm_90" and row.wgmma is False and row.dot_input in WGMMA_INPUTS
            and row.dot_rows >= WGMMA_MIN_ROWS):
        problems.append(f"no wgmma: {row.dot_input} dot tile of {row.dot_rows} rows "
                        f"({row.num_warps} warps) runs on {row.mma or 'FMA units'}")
    return problems


def render_table(rows: Sequence[ReportRow]) -> str:
    """Format rows as an aligned text table with a status column."""

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    header = ["kernel", "config", "arch", "regs", "smem", "static", "stack", "local",
              "spill st/ld", "mma", "status"]
    body = []
    for row in rows:
        if row.spill_stores is None or row.spill_loads is None:
            spills = "-"
        else:
            spills = f"{row.spill_stores}/{row.spill_loads}"
        mma = "-" if row.mma is None else (row.mma or "none")
        problems = check_limits(row)
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        body.append([row.kernel, row.config, row.arch, num(row.registers), num(row.shared),
                     num(row.static_shared), num(row.stack), num(row.local), spills, mma,
                     status])
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def compile_builds(
    builds: Sequence[KernelBuild], archs: Sequence[str], jobs: int | None = None
) -> list[ReportRow]:
    """Compile every build for every arch of its config families (``KernelBuild.archs``),
    ``jobs`` at a time; rows in build, then arch order."""
    tasks = [
        (i, arch) for i, build in enumerate(builds) for arch in archs
        if config_family(arch) in build.archs
    ]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    refs = [_build_ref(build) for build in builds]
    # Fresh (spawned) workers without TRITON_INTERPRET: once triton is imported under the
    # interpreter (as the kernel tests do), its library functions are bound to it for the life of
    # the process and real compilation fails there.
    ctx = multiprocessing.get_context("spawn")
    with _interpreter_unset(), ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init_worker, initargs=(refs,)
    ) as pool:
        futures = [pool.submit(_compile_task, i, arch) for i, arch in tasks]
        rows = []
        for (i, arch), future in zip(tasks, futures, strict=True):
            try:
                rows.append(future.result())
            except Exception as exc:  # a worker that died (e.g. LLVM crash) fails its rows
                rows.append(replace(_empty_row(builds[i], arch), error=_summarize(exc)))
        return rows


@contextlib.contextmanager
def _interpreter_unset() -> Iterator[None]:
    """TRITON_INTERPRET removed from the environment that workers inherit, then restored."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _build_ref(build: KernelBuild) -> tuple[str, str, KernelBuild]:
    """A picklable stand-in: where the kernel lives, and the build without its JITFunction."""
    fn = build.fn.fn
    return fn.__module__, fn.__qualname__, replace(build, fn=None)


def _resolve(ref: tuple[str, str, KernelBuild]) -> KernelBuild:
    module, qualname, build = ref
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return replace(build, fn=obj)


def _compile_build(build: KernelBuild, arch: str) -> ReportRow:
    """Compile one build for one arch ("sm_90") and measure it; failures land in ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = _empty_row(build, arch)
    capability = int(arch.removeprefix("sm_"))
    log = io.StringIO()
    try:
        signature, attrs = _triton_signature(build)
        src = ASTSource(fn=build.fn, signature=signature, constexprs=build.constexprs, attrs=attrs)
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope():
            # A cache hit skips ptxas, and ptxas' log is the only source of the spill counts.
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(
                    src,
                    target=GPUTarget("cuda", capability, 32),
                    options={"num_warps": build.num_warps, "num_stages": build.num_stages},
                )
        usage = _res_usage(kernel.asm["cubin"], kernel.metadata.name)
    except Exception as exc:
        return replace(row, error=_summarize(exc))
    spills = _ptxas_spills(log.getvalue())
    return replace(
        row,
        registers=usage.get("REG"),
        shared=kernel.metadata.shared,
        static_shared=usage.get("SHARED"),
        stack=usage.get("STACK"),
        local=usage.get("LOCAL"),
        spill_stores=spills[0] if spills else None,
        spill_loads=spills[1] if spills else None,
        wgmma="wgmma" in kernel.asm["ptx"],
        mma=mma_instructions(kernel.asm["ptx"]),
    )


def mma_instructions(ptx: str) -> str:
    """The tensor-core instructions of ``ptx`` as "kind.operand" ("wgmma.bf16", "mma.tf32"), sorted
    and comma-joined; "" when it has none."""
    return ",".join(sorted({f"{kind}.{operand}" for kind, operand in _MMA_PTX.findall(ptx)}))


def main(argv: list[str] | None = None) -> int:
    """CLI entry: compile, print the table, return 1 on any problem (2 without triton)."""
    parser = argparse.ArgumentParser(
        prog="python -m molt_kernels gpu-report",
        description="Compile every Triton kernel for real GPU targets (no GPU needed) and check "
        "registers, shared memory and spills.",
    )
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help=f"comma list of targets among {', '.join(SHARED_MEM_LIMITS)}")
    parser.add_argument("--kernel", metavar="SUBSTRING", help="only kernels whose name has this")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows here")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel compiles (default: number of CPUs)")
    step = parser.add_argument_group(
        "--step", "count one forward+backward step of MOLT(d, paper ranks for N, k) on the "
        "triton backend under the interpreter: launches, working programs, aten ops, bytes")
    step.add_argument("--step", action="store_true", help="print the step counts and exit")
    step.add_argument("--d", type=int, default=256, help="width (default 256)")
    step.add_argument("--n", type=int, default=2, help="paper-allocation N (default 2)")
    step.add_argument("--k", type=int, default=8, help="top-k; 0 for k=None (default 8)")
    step.add_argument("--tokens", type=int, default=1024, help="tokens (default 1024)")
    step.add_argument("--cost", action="store_true",
                      help="print the roofline cost model of the step (bf16, modeled) and exit")
    step.add_argument("--gpu", choices=("h100", "h200", "a100"), default="h100")
    step.add_argument("--l0", type=float, default=32.0, help="active pairs per token for k=None")
    step.add_argument("--routing", choices=("uniform", "zipf"), default="uniform",
                      help="routing the --cost simulation routes (default uniform)")
    step.add_argument("--combine", choices=COMBINES, default="fixed",
                      help="--cost of this combine (default fixed, the bf16 default; atomic: the "
                      "opt-in nondeterministic one)")
    args = parser.parse_args(argv)
    if args.step:
        return _step(args)
    if args.cost:
        from .cost_model import render_cost, step_cost

        cost = step_cost(args.d, args.n, args.k or None, args.tokens, args.l0, args.gpu,
                         combine=args.combine, routing=args.routing)
        print(render_cost(cost))
        if args.json is not None:
            args.json.write_text(json.dumps(cost, indent=2))
        return 0
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in SHARED_MEM_LIMITS]
    if unknown or not archs:
        parser.error(f"--arch: unknown target(s) {unknown}; known: {', '.join(SHARED_MEM_LIMITS)}")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")

    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu-report needs triton, which cannot be imported: {exc}", file=sys.stderr)
        return 2

    builds = [b for b in collect_builds() if args.kernel is None or args.kernel in b.name]
    if not builds:
        what = f"matching {args.kernel!r}" if args.kernel else "registered"
        print(f"gpu-report: no kernel builds {what}; nothing was checked", file=sys.stderr)
        return 1

    rows = compile_builds(builds, archs, args.jobs)
    if not rows:
        print(f"gpu-report: no build is picked on {', '.join(archs)}", file=sys.stderr)
        return 1
    print(render_table(rows))
    failed = [row for row in rows if check_limits(row)]
    if args.json is not None:
        args.json.write_text(
            json.dumps([asdict(row) | {"problems": check_limits(row)} for row in rows], indent=2)
        )
    print(f"\n{len(rows)} builds checked, {len(failed)} with problems")
    return 1 if failed else 0


def _step(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton binds its language to a backend when the package is imported, before this runs:
        # the interpreter needs a fresh process.
        if Path(sys.argv[0]).resolve() == Path(__file__).resolve().parents[1] / "__main__.py":
            os.execve(sys.executable, [sys.executable, "-m", "molt_kernels", *sys.argv[1:]],
                      {**os.environ, "TRITON_INTERPRET": "1"})
        raise SystemExit("gpu-report --step runs the kernels under the Triton interpreter: "
                         "set TRITON_INTERPRET=1 before importing molt_kernels")
    from .step_report import render_step, run_step

    for name in ("d", "n", "tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gpu-report: --{name} must be >= 1")
    counts = run_step(args.d, args.n, args.k or None, args.tokens)
    k = args.k or "None"
    print(f"one forward+backward step, d={args.d}, N={args.n}, k={k}, {args.tokens} tokens, fp32, "
          "triton backend under TRITON_INTERPRET=1 (after one warm-up step)")
    print(render_step(counts))
    return 0


_worker_builds: Sequence[KernelBuild] = ()


def _init_worker(refs: Sequence[tuple[str, str, KernelBuild]]) -> None:
    global _worker_builds
    _worker_builds = [_resolve(ref) for ref in refs]
    # Triton warns once per process about its FP-fusion default; one per worker drowns the table.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile_task(index: int, arch: str) -> ReportRow:
    return _compile_build(_worker_builds[index], arch)


def _empty_row(build: KernelBuild, arch: str) -> ReportRow:
    return ReportRow(kernel=build.name, config=build.config, arch=arch,
                     num_warps=build.num_warps, num_stages=build.num_stages,
                     dot_rows=build.dot_rows, dot_input=build.dot_input)


def _triton_signature(
    build: KernelBuild,
) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[object]]]]:
    """Signature in parameter order without ``:16`` hints, and the divisibility attrs.

    Also rejects registry entries that triton.compile would silently build wrong.
    """
    from triton.runtime import JITFunction

    fn = build.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"fn must be a bare @triton.jit function, got {type(fn).__name__} "
                        "(for an autotuned kernel pass its .fn)")
    params = set(fn.arg_names)
    missing = [p for p in fn.arg_names if p not in build.signature]
    extra = [p for p in build.signature if p not in params]
    if missing or extra:
        raise ValueError(f"signature does not match {fn.__name__}: missing {missing}, "
                         f"unknown {extra}")
    declared = {p.name for p in fn.params if p.is_constexpr}
    typed = {name for name, t in build.signature.items() if t == "constexpr"}
    if declared - typed:
        raise ValueError(f"tl.constexpr parameters typed otherwise: {sorted(declared - typed)}")
    if typed != set(build.constexprs):
        raise ValueError(f"constexprs {sorted(build.constexprs)} must give exactly the constexpr "
                         f"parameters {sorted(typed)}")
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for i, name in enumerate(fn.arg_names):
        base, _, hint = build.signature[name].partition(":")
        if hint not in ("", "16") or (hint and (base.startswith("*") or base == "constexpr")):
            raise ValueError(f"{name}: {build.signature[name]!r}; only integer types take ':16'")
        signature[name] = base
        if base.startswith("*") or hint:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _summarize(exc: BaseException) -> str:
    """Type and first line of an error; a CompilationError puts its message last, after source."""
    message = getattr(exc, "error_message", None) or str(exc)
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _res_usage(cubin: bytes, function: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL/... of ``function`` from ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(_cuobjdump()), "-res-usage", str(path)], check=True,
                             capture_output=True, text=True).stdout
    # "Function NAME:" then one line of "KEY:VALUE" pairs ("CONSTANT[0]:432" included).
    functions = {
        m.group(1): {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", m.group(2))}
        for m in re.finditer(r"^\s*Function\s+(\S+):[ \t]*\n(.*)$", out, re.MULTILINE)
    }
    if function in functions:
        return functions[function]
    if len(functions) == 1:
        return next(iter(functions.values()))
    raise RuntimeError(f"cuobjdump -res-usage lists no function {function!r}: {sorted(functions)}")


def _ptxas_spills(log: str) -> tuple[int, int] | None:
    """(spill store bytes, spill load bytes) from ptxas -v output, None if it has none."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not found:
        return None
    return sum(int(s) for s, _ in found), sum(int(ld) for _, ld in found)
