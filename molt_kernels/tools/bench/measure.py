"""Measuring a step: time, peak memory, the dense matmul rate, and the runner over a grid."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...layers.config import MOLTConfig
from ...layers.flops import (
    molt_cost,
    molt_reference_cost,
    transcoder_cost,
)
from ...layers.transcoder import TranscoderConfig
from ..cost_model import GPUS, step_cost
from .workload import (
    MODES,
    REFERENCE,
    TRANSCODER,
    TRITON,
    BenchCase,
    make_inputs,
    make_molt,
    make_transcoder,
    measure_routing,
    sparse_backend,
    step_fn,
)

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
DEFAULT_MAX_RUN_SECONDS = 20.0
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
MATMUL_WARMUP_S = 1.0
MATMUL_MIN_REPEATS = 10
# Share of the free memory one run may plan to use; the rest is headroom for estimate error.
MEMORY_FRACTION = 0.5
MIB = 1 << 20
# Settings that change CPU timings: thread counts and PyTorch's huge-page allocation switch.
RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
PROC_MEMINFO = Path("/proc/meminfo")
RESET_PEAK_RSS = "5"  # clear_refs code that resets VmHWM to the current RSS (Linux >= 4.0)


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


def model_gpu(device: torch.device, dtype: torch.dtype) -> str | None:
    """The cost model's name ("h100", "h200", "a100") for this device, None where the model does
    not apply: not CUDA, another GPU, or a dtype other than bf16 (the model's only dtype)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((gpu for gpu in GPUS if gpu in name), None)


def modeled_seconds(case: BenchCase, mode: str, gpu: str) -> float:
    """MODELED seconds of ``mode`` for the triton backend at ``case`` on ``gpu``: the whole step
    for forward_backward, the kernels named "forward" for forward."""
    cost = step_cost(case.d, case.n, case.k, case.tokens, gpu=gpu)
    if mode == "forward_backward":
        return cost["modeled_step_seconds"]
    return sum(k["seconds"] for k in cost["kernels"] if "forward" in k["kernel"])


def dense_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """FLOP/s of a square matmul in ``dtype``: the machine's dense reference rate.

    Warmed up for MATMUL_WARMUP_S first: on an idle CPU the first second or so of matmuls ran
    at about half the rate of the following ones (measured 91 -> 195 GFLOP/s on the 2-core
    EPYC), and a rate taken cold would flatter every "of mm" fraction.
    """
    n = MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    start = time.perf_counter()
    while time.perf_counter() - start < MATMUL_WARMUP_S:
        fn()
        synchronize(device)
    seconds = statistics.median(time_runs(fn, device, max(repeats, MATMUL_MIN_REPEATS)))
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
    # The roofline cost model's time for this row (tools/cost_model.py; MODELED, not measured):
    # triton rows in bf16 on a GPU the model has datasheet numbers for, else None.
    modeled_s: float | None = None


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
        self.model_gpu = model_gpu(device, dtype)
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
                if impl == TRITON and self.model_gpu is not None:
                    result.modeled_s = modeled_seconds(case, mode, self.model_gpu)
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
