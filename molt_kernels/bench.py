"""Benchmark tables: MOLT backends against the naive reference and a parameter-matched transcoder.

``python -m molt_kernels bench [--quick] [--json PATH] [--plot PATH] ...`` (or
``python -m molt_kernels.bench``). For every config (paper allocation ``MOLTConfig.paper(d, N, k)``,
inputs x ~ N(0, 1) so that the initial gates open about k transforms per token) and every
implementation (each MOLT backend that runs natively here, plus the matched TopK transcoder), it
measures, for the forward pass (under ``no_grad``) and for forward + backward (gradients of x and
of every parameter, ``.grad`` reset to None before each step, as ``zero_grad`` does):

- time: median of ``--repeats`` runs after a warm-up (CUDA: ``triton.testing.do_bench``, median);
- useful FLOP/s: the MOLT's useful FLOPs (gate + active transforms, from the measured routing; see
  :mod:`molt_kernels.flops`) per second, and its fraction of the machine's dense matmul FLOP/s,
  measured in the same run (square matmul in the benchmark dtype);
- peak memory of one step over what was allocated before it. CUDA: ``max_memory_allocated``.
  CPU: free heap memory is handed back to the OS (``malloc_trim``), the resident-set high-water
  mark is reset (writing "5" to ``/proc/self/clear_refs``) and the step's peak is VmHWM minus the
  VmRSS before it (both from ``/proc/self/status``); this counts every page the step touched,
  allocator slack included. That step is the warm-up run, which is not timed;
- speed-up over the naive reference, and the fraction of the FLOP ratio (reference FLOPs / useful
  FLOPs) that it realises.

Runs that would not fit in memory, or whose predicted time per run (from the FLOP rate the same
implementation reached on the previous, smaller config) exceeds ``--max-run-seconds``, are skipped
and listed with the reason. ``--json`` saves everything (with the load average and the settings
that change CPU timings); ``--render`` prints and plots a saved report again.

CPU timings depend on the allocator: every fresh tensor of more than 32 MiB is a new mmap whose
pages fault in one by one, which can cost more than the op that fills it. ``THP_MEM_ALLOC_ENABLE=1``
(PyTorch's switch for huge-page backed CPU allocations, read at start-up) removes most of that;
reports record whether it was set.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backend import available_backends
from .config import MOLTConfig
from .flops import (
    BACKWARD_PER_FORWARD,
    matched_transcoder,
    molt_cost,
    molt_reference_cost,
    routed_active_rank,
    transcoder_cost,
)
from .modules import MOLT
from .transcoder import TopKTranscoder, TranscoderConfig

GRID_D = (768, 2304, 4096)
GRID_N = (1, 4, 16)
GRID_K = (8, 32)
GRID_TOKENS = (1024, 8192, 32768)
# Issue #2's acceptance measurement: reference vs torch at d=512, N=2, k=8, 4096 tokens.
QUICK = {"d": (512,), "n": (2,), "k": (8,), "tokens": (4096,)}
MODES = ("forward", "forward_backward")
TRANSCODER = "transcoder"
REFERENCE = "reference"

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
DEFAULT_MAX_RUN_SECONDS = 20.0
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
# Share of the free memory one run may plan to use; the rest is headroom for estimate error.
MEMORY_FRACTION = 0.5
MIB = 1 << 20
SEED = 0
# Settings that change CPU timings: thread counts and PyTorch's huge-page allocation switch.
RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
PROC_MEMINFO = Path("/proc/meminfo")
RESET_PEAK_RSS = "5"  # clear_refs code that resets VmHWM to the current RSS (Linux >= 4.0)


# -- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One benchmark config: the paper allocation with N, width d, top-k and a token count."""

    d: int
    n: int
    k: int
    tokens: int

    @property
    def name(self) -> str:
        return f"d={self.d} N={self.n} k={self.k} tok={self.tokens}"

    def molt_config(self) -> MOLTConfig:
        return MOLTConfig.paper(self.d, self.n, self.k)

    def invalid_reason(self) -> str | None:
        t = MOLTConfig.paper(self.d, self.n, None).n_transforms
        return f"k={self.k} > T={t} transforms" if self.k > t else None


def grid(
    d: Sequence[int], n: Sequence[int], k: Sequence[int], tokens: Sequence[int]
) -> list[BenchCase]:
    """Every combination, in (d, N, k, tokens) order."""
    return [BenchCase(*c) for c in product(d, n, k, tokens)]


def native_backends(device: torch.device) -> tuple[str, ...]:
    """MOLT backends that run natively on ``device`` (the Triton interpreter is not timed)."""
    return tuple(
        b for b in available_backends(device) if not (b == "triton" and device.type != "cuda")
    )


def sparse_backend(backends: Sequence[str]) -> str:
    """The fastest sparse backend among ``backends`` (fused kernels before PyTorch)."""
    return "triton" if "triton" in backends else "torch"


# -- workloads ---------------------------------------------------------------------------------


def make_inputs(
    tokens: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """x [tokens, d_in] ~ N(0, 1) (a leaf that requires grad) and grad_y [tokens, d_out]."""
    g = torch.Generator(device="cpu").manual_seed(SEED)
    x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype)
    grad_y = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(), grad_y


def make_molt(cfg: MOLTConfig, device: torch.device, dtype: torch.dtype) -> MOLT:
    """A MOLT with seeded initial weights (its backend is set per run)."""
    torch.manual_seed(SEED)
    return MOLT(cfg, device=device, dtype=dtype)


def make_transcoder(
    cfg: TranscoderConfig, backend: str, device: torch.device, dtype: torch.dtype
) -> TopKTranscoder:
    """A TopK transcoder with seeded initial weights."""
    torch.manual_seed(SEED)
    return TopKTranscoder(cfg, backend=backend, device=device, dtype=dtype)


@torch.no_grad()
def measure_routing(molt: MOLT, x: Tensor) -> tuple[float, float]:
    """(active transforms, sum of their ranks), per token on average, of ``molt``'s gate on x."""
    gates, indices = molt.encode(x)
    active = (gates != 0).sum(-1).float().mean().item() if gates.numel() else 0.0
    return active, routed_active_rank(molt.cfg, indices, gates)


def step_fn(layer: nn.Module, x: Tensor, grad_y: Tensor, mode: str) -> Callable[[], None]:
    """One benchmark step: ``forward`` under no_grad, or ``forward_backward`` into fresh grads."""
    if mode == "forward":

        def step() -> None:
            with torch.no_grad():
                layer(x)

        return step
    if mode != "forward_backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = list(layer.parameters())

    def step() -> None:
        for p in (x, *params):
            p.grad = None
        layer(x).backward(grad_y)

    return step


# -- measurement -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(name: str) -> int:
    match = re.search(rf"^{name}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{name} not in {PROC_STATUS}")
    return int(match.group(1))


def _malloc_trim() -> None:
    # glibc keeps freed small and medium blocks; handing them back makes their reuse show in RSS.
    name = ctypes.util.find_library("c")
    if name is not None:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where /proc does not allow it (not Linux)."""
    try:
        _status_kib("VmHWM")
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def run_with_peak(fn: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    """Run ``fn`` once: (seconds, peak bytes over the memory in use before; None if unknown)."""
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _malloc_trim()
        base = _status_kib("VmRSS") if _reset_peak_rss() else None
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(device) - base
    if base is None:
        return seconds, None
    return seconds, (_status_kib("VmHWM") - base) * 1024


def time_runs(fn: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` runs of ``fn`` (warm it up first). CUDA: do_bench's median."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return [do_bench(fn, return_mode="median") / 1e3]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def dense_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """FLOP/s of a square matmul in ``dtype``: the machine's dense reference rate."""
    n = MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    fn()
    synchronize(device)
    seconds = statistics.median(time_runs(fn, device, repeats))
    return {"size": n, "seconds": seconds, "flops_per_s": 2 * n**3 / seconds}


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    match = re.search(r"^MemAvailable:\s+(\d+) kB", PROC_MEMINFO.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def planned_bytes(
    impl: str, cfg: MOLTConfig, tcfg: TranscoderConfig, tokens: int, mode: str, elem: int
) -> int:
    """Rough upper bound on one run's working set, to skip runs that cannot fit.

    Factors are rounded up from peaks measured on the CPU: the reference holds [tokens, sum(r)]
    rank-space activations (one in the forward, three in the backward); the transcoder ~6
    [tokens, F] temporaries (the gate's tie-exact top-k, one of them int64); the sparse path
    [pairs, d] gathered rows and outputs (about three at a time). Weights (and their gradients),
    x, y, dx and grad_y are counted too.
    """
    train = mode == "forward_backward"
    io = 2 * tokens * (cfg.d_in + cfg.d_out)
    if impl == TRANSCODER:
        weights = (2 if train else 1) * tcfg.n_parameters()
        return elem * (weights + 7 * tokens * tcfg.n_features + io)
    weights = (2 if train else 1) * cfg.n_parameters()
    if impl == REFERENCE:
        return elem * (weights + (3 if train else 1) * tokens * cfg.total_rank + io)
    pairs = tokens * cfg.k
    return elem * (weights + 3 * pairs * max(cfg.d_in, cfg.d_out) + io)


@dataclass
class Result:
    """One (config, implementation, mode) measurement; ``skipped`` says why it was not run."""

    d: int
    n: int
    k: int
    tokens: int
    impl: str
    mode: str
    params: int
    flops_per_token: float  # what this implementation computes, analytically
    useful_flops_per_token: float  # MOLT rows: useful MOLT FLOPs; transcoder: its own sparse FLOPs
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    useful_flops_per_s: float | None = None
    fraction_of_matmul: float | None = None
    speedup_vs_reference: float | None = None
    fraction_of_flop_ratio: float | None = None
    skipped: str | None = None


@dataclass
class CaseInfo:
    case: BenchCase
    cfg: MOLTConfig | None
    tcfg: TranscoderConfig | None
    active_transforms: float | None = None
    active_rank: float | None = None
    skipped: str | None = None


class Runner:
    """Measures cases in order, predicting each run's time from the previous rates."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.elem = torch.empty(0, dtype=dtype).element_size()
        self.matmul = dense_matmul_rate(device, dtype, args.repeats)
        # FLOP/s each (impl, mode) reached on its last run; starts at the dense matmul rate.
        self.rates: dict[tuple[str, str], float] = {}

    def skip_reason(self, impl: str, mode: str, flops: float, need: int) -> str | None:
        free = free_bytes(self.device)
        if need > MEMORY_FRACTION * free:
            return f"needs ~{need / MIB:.0f} MiB, {free / MIB:.0f} MiB free"
        rate = self.rates.get((impl, mode), self.matmul["flops_per_s"])
        predicted = flops / rate
        limit = self.args.max_run_seconds
        if predicted > limit:
            return f"predicted {predicted:.0f} s/run > --max-run-seconds {limit:g}"
        return None

    def measure(self, result: Result, step: Callable[[], None], executed_flops: float) -> None:
        """Fill ``result`` with the time and peak memory of ``step``."""
        seconds, result.peak_bytes = run_with_peak(step, self.device)
        if seconds > self.args.max_run_seconds:
            result.skipped = f"one run took {seconds:.0f} s > --max-run-seconds"
        else:
            result.times_s = time_runs(step, self.device, self.args.repeats)
            seconds = statistics.median(result.times_s)
            result.time_s = seconds
            useful = result.useful_flops_per_token * result.tokens
            result.useful_flops_per_s = useful / seconds
            result.fraction_of_matmul = result.useful_flops_per_s / self.matmul["flops_per_s"]
        self.rates[(result.impl, result.mode)] = executed_flops / seconds

    def run_case(self, info: CaseInfo, impls: Sequence[str], progress: Any) -> list[Result]:
        case, cfg, tcfg = info.case, info.cfg, info.tcfg
        results = []
        molt = make_molt(cfg, self.device, self.dtype)
        x, grad_y = make_inputs(case.tokens, case.d, case.d, self.device, self.dtype)
        molt.backend = sparse_backend(impls)
        info.active_transforms, info.active_rank = measure_routing(molt, x)
        useful = molt_cost(cfg, info.active_rank)
        for impl in impls:
            layer = molt
            if impl == TRANSCODER:
                layer = make_transcoder(tcfg, sparse_backend(impls), self.device, self.dtype)
                cost = own = transcoder_cost(tcfg)
            else:
                layer.backend = impl
                cost = molt_reference_cost(cfg) if impl == REFERENCE else useful
                own = useful
            for mode in self.args.modes:
                per_token = cost.forward if mode == "forward" else cost.forward_backward
                result = Result(
                    d=case.d,
                    n=case.n,
                    k=case.k,
                    tokens=case.tokens,
                    impl=impl,
                    mode=mode,
                    params=cost.params,
                    flops_per_token=per_token,
                    useful_flops_per_token=(
                        own.forward if mode == "forward" else own.forward_backward
                    ),
                )
                executed = per_token * case.tokens
                need = planned_bytes(impl, cfg, tcfg, case.tokens, mode, self.elem)
                result.skipped = self.skip_reason(impl, mode, executed, need)
                if result.skipped is None:
                    self.measure(result, step_fn(layer, x, grad_y, mode), executed)
                results.append(result)
                progress.update(1)
            if impl == TRANSCODER:
                del layer
        _relate(results)
        return results


def _relate(results: list[Result]) -> None:
    """Speed-ups over the reference, and the fraction of the FLOP ratio they realise."""
    for mode in MODES:
        ref = next(
            (r for r in results if r.mode == mode and r.impl == REFERENCE and r.time_s), None
        )
        if ref is None:
            continue
        for r in results:
            if r.mode != mode or r.time_s is None:
                continue
            r.speedup_vs_reference = ref.time_s / r.time_s
            if r.impl != TRANSCODER:
                r.fraction_of_flop_ratio = r.speedup_vs_reference / (
                    ref.flops_per_token / r.flops_per_token
                )


# -- reporting ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU: {cpu_model()}, {threads} thread{'' if threads == 1 else 's'}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *map(line, rows)])


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _flops(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _cell_time(r: Result | None) -> str:
    if r is None:
        return "-"
    return "skip" if r.skipped else f"{r.time_s * 1e3:.1f}"


def _cell_rate(r: Result | None) -> str:
    if r is None or r.time_s is None:
        return "-"
    return f"{r.useful_flops_per_s / 1e9:.1f} ({r.fraction_of_matmul:.0%})"


def _cell_peak(r: Result | None) -> str:
    return "-" if r is None else _fmt(r.peak_bytes, ".0f", 1 / MIB)


Index = dict[tuple[BenchCase, str, str], Result]


def index_results(results: Sequence[Result]) -> Index:
    """Results by (case, impl, mode)."""
    return {(_case(r), r.impl, r.mode): r for r in results}


def _case(r: Result) -> BenchCase:
    return BenchCase(r.d, r.n, r.k, r.tokens)


def _time_ratio(num: Result | None, den: Result | None) -> float | None:
    if num is None or den is None or num.time_s is None or den.time_s is None:
        return None
    return num.time_s / den.time_s


def main_table(results: Sequence[Result], impls: Sequence[str]) -> str:
    """One row per (config, implementation), forward and forward+backward side by side."""
    headers = [
        "config", "impl", "FLOP/tok fwd", "fwd ms", "f+b ms", "f+b/fwd",
        "useful GFLOP/s fwd (of mm)", "useful GFLOP/s f+b (of mm)", "fwd MiB", "f+b MiB",
        "speed-up fwd", "speed-up f+b", "of FLOP ratio fwd", "of FLOP ratio f+b",
    ]  # fmt: skip
    index = index_results(results)
    rows = []
    for case in dict.fromkeys(_case(r) for r in results):
        for impl in impls:
            f, b = index.get((case, impl, "forward")), index.get((case, impl, "forward_backward"))
            if f is None and b is None:
                continue
            flops = f.flops_per_token if f else b.flops_per_token / (1 + BACKWARD_PER_FORWARD)
            rows.append([
                case.name, impl, _flops(flops), _cell_time(f), _cell_time(b),
                _fmt(_time_ratio(b, f), ".2f"), _cell_rate(f), _cell_rate(b),
                _cell_peak(f), _cell_peak(b),
                _fmt(f and f.speedup_vs_reference, ".2f"),
                _fmt(b and b.speedup_vs_reference, ".2f"),
                _fmt(f and f.fraction_of_flop_ratio, ".0%"),
                _fmt(b and b.fraction_of_flop_ratio, ".0%"),
            ])  # fmt: skip
    return render_table(headers, rows)


def transcoder_table(results: Sequence[Result], infos: Sequence[CaseInfo]) -> str:
    """Matched transcoder against the fastest MOLT backend: forward FLOPs per token and times."""
    headers = [
        "config", "TC F / k", "MOLT FLOP/tok", "TC FLOP/tok", "TC/MOLT FLOPs",
        "MOLT fwd ms", "TC fwd ms", "TC/MOLT fwd", "MOLT f+b ms", "TC f+b ms", "TC/MOLT f+b",
    ]  # fmt: skip
    index = index_results(results)
    rows = []
    for info in infos:
        if info.tcfg is None or info.active_rank is None:
            continue
        molt_flops = molt_cost(info.cfg, info.active_rank).forward
        tc_flops = transcoder_cost(info.tcfg).forward
        cells = [
            info.case.name, f"{info.tcfg.n_features} / {info.tcfg.k}", _flops(molt_flops),
            _flops(tc_flops), f"{tc_flops / molt_flops:.1f}",
        ]  # fmt: skip
        for mode in MODES:
            molt = _fastest(
                [r for (c, impl, m), r in index.items()
                 if c == info.case and m == mode and impl not in (REFERENCE, TRANSCODER)]
            )  # fmt: skip
            tc = index.get((info.case, TRANSCODER, mode))
            cells += [_cell_time(molt), _cell_time(tc), _fmt(_time_ratio(tc, molt), ".1f")]
        rows.append(cells)
    return render_table(headers, rows)


def _fastest(results: Sequence[Result]) -> Result | None:
    timed = [r for r in results if r.time_s is not None]
    if timed:
        return min(timed, key=lambda r: r.time_s)
    return results[0] if results else None


def skip_notes(results: Sequence[Result], infos: Sequence[CaseInfo]) -> list[str]:
    notes = [f"{i.case.name}: skipped, {i.skipped}" for i in infos if i.skipped]
    for r in results:
        if r.skipped:
            notes.append(f"{_case(r).name} {r.impl} {r.mode}: skipped, {r.skipped}")
    return notes


def plot(results: Sequence[Result], path: Path) -> None:
    """Forward time and FLOPs per token versus parameters: one column per width d, one line per
    (implementation, k); time per token is the best over the token counts measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    forward = [r for r in results if r.mode == "forward"]
    widths = sorted({r.d for r in forward})
    fig, axes = plt.subplots(
        2, len(widths), figsize=(5 * len(widths), 8), squeeze=False, sharex="col"
    )
    for col, d in enumerate(widths):
        ax_t, ax_f = axes[0][col], axes[1][col]
        lines: dict[tuple[str, int], dict[int, list[Result]]] = {}
        for r in forward:
            if r.d == d:
                lines.setdefault((r.impl, r.k), {}).setdefault(r.params, []).append(r)
        for (impl, k), by_params in sorted(lines.items()):
            label = f"{impl} k={k}"
            params = sorted(by_params)
            ax_f.plot(params, [by_params[p][0].flops_per_token for p in params], "o-", label=label)
            timed = {
                p: min(r.time_s / r.tokens for r in rs if r.time_s is not None)
                for p, rs in by_params.items()
                if any(r.time_s is not None for r in rs)
            }
            if timed:
                xs = sorted(timed)
                ax_t.plot(xs, [timed[p] * 1e6 for p in xs], "o-", label=label)
        ax_t.set_title(f"d = {d}")
        ax_t.set_ylabel("forward time per token (us)")
        ax_f.set_ylabel("forward FLOPs per token")
        ax_f.set_xlabel("parameters (N = 1, 4, 16)")
        for ax in (ax_t, ax_f):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    else:
        report = measure(parser, args, argv)
    print(render_report(report))
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
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

    load_before = _load_average()
    runner = Runner(args, device, dtype)
    results: list[Result] = []
    total = len(todo) * len(impls) * len(args.modes)
    with tqdm(total=total, desc="bench", file=sys.stderr, disable=args.no_progress) as bar:
        for info in todo:
            bar.set_postfix_str(info.case.name)
            results += runner.run_case(info, impls, bar)
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
        # Other processes' load skews CPU timings; allocator settings change them (see RESULTS.md).
        "load_average": {"before": load_before, "after": _load_average()},
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


def render_report(report: dict[str, Any]) -> str:
    """The tables and skip notes of a report from :func:`measure`."""
    results = [Result(**r) for r in report["results"]]
    infos = [_case_info(c) for c in report["cases"]]
    mm = report["dense_matmul"]
    lines = [
        f"# molt_kernels bench: {report['device_name']}, torch {report['torch']}, "
        f"{report['dtype']}, {report['date']}",
        f"`{report['command']}`",
        "; ".join(
            [
                f"dense {mm['size']}x{mm['size']} matmul: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s",
                f"load average before/after: {report['load_average']['before']} / "
                f"{report['load_average']['after']}",
                *(f"{k}={v}" for k, v in report["environment"].items() if v is not None),
            ]
        ),
        "",
        main_table(results, report["impls"]),
        "",
        transcoder_table(results, infos),
    ]
    notes = skip_notes(results, infos)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def _case_json(info: CaseInfo) -> dict[str, Any]:
    out: dict[str, Any] = asdict(info.case)
    out["skipped"] = info.skipped
    if info.cfg is not None:
        out |= {
            "rank_counts": [[r, c] for r, c in info.cfg.rank_counts.items()],
            "n_transforms": info.cfg.n_transforms,
            "params": info.cfg.n_parameters(),
            "active_transforms": info.active_transforms,
            "active_rank": info.active_rank,
            "transcoder": info.tcfg.to_dict(),
            "transcoder_params": info.tcfg.n_parameters(),
        }
    return out


def _case_info(case: dict[str, Any]) -> CaseInfo:
    bench_case = BenchCase(case["d"], case["n"], case["k"], case["tokens"])
    if case["skipped"]:
        return CaseInfo(bench_case, None, None, skipped=case["skipped"])
    return CaseInfo(
        bench_case,
        bench_case.molt_config(),
        TranscoderConfig.from_dict(case["transcoder"]),
        active_transforms=case["active_transforms"],
        active_rank=case["active_rank"],
    )


if __name__ == "__main__":
    raise SystemExit(main())


def gate_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`bench --gate`: the gate table (see :mod:`molt_kernels.bench_gate`)."""
    from . import bench_gate

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
    print(f"# gate: {device_name(device)}, {str(dtype).removeprefix('torch.')}, torch "
          f"{torch.__version__}, median of {repeats}")
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gate": rows}, indent=1) + "\n")
    return 0
