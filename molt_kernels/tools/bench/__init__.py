"""Benchmark tables: MOLT backends against the naive reference and a parameter-matched transcoder.

``python -m molt_kernels bench [--quick] [--json PATH] [--plot PATH] ...`` (the pytest-benchmark
suites in ``bench/`` run the same workloads). Modules: ``workload`` (grids, inputs, the timed step),
``measure`` (time, memory, the runner), ``report`` (tables, plots, JSON), ``gate`` (the gate table),
``cli``. For every config (paper allocation ``MOLTConfig.paper(d, N, k)``,
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

from .cli import int_list, main
from .measure import synchronize
from .report import render_table
from .workload import (
    GRID_D,
    GRID_K,
    GRID_N,
    GRID_TOKENS,
    MODES,
    QUICK,
    BenchCase,
    make_inputs,
    make_molt,
    make_transcoder,
    measure_routing,
    native_backends,
    sparse_backend,
    step_fn,
)

__all__ = [
    "GRID_D",
    "GRID_K",
    "GRID_N",
    "GRID_TOKENS",
    "MODES",
    "QUICK",
    "BenchCase",
    "int_list",
    "main",
    "make_inputs",
    "make_molt",
    "make_transcoder",
    "measure_routing",
    "native_backends",
    "render_table",
    "sparse_backend",
    "step_fn",
    "synchronize",
]
