"""Launch configurations of every Triton kernel: tile sizes, warps and pipeline depth, in one place.

The launch code (``ops/<op>/launch.py``) asks here for its configs; the gpu-report builds
(``ops/<op>/builds.py``) enumerate the same functions, so every config the launchers can pick is
compiled for sm_80 and sm_90 in CI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .dtypes import HALF, accumulator_dtype


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1); no Triton import needed to plan launches."""
    return 1 << max(0, n - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# gate_topk: the fused gate and its backward

# Largest running list kept in registers; larger k takes the dense fallback.
MAX_K_PAD = 256
# The smallest list the selection kernels keep: smaller k would only add compile variants.
MIN_K_PAD = 8


@dataclass(frozen=True)
class FwdConfig:
    """Tiles of the selection kernels: BLOCK_N tokens x BLOCK_T transforms, K_PAD kept keys."""

    block_n: int
    block_t: int
    block_d: int
    k_pad: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return (f"K_PAD={self.k_pad},BN={self.block_n},BT={self.block_t},BD={self.block_d},"
                f"w{self.num_warps}s{self.num_stages}")


@dataclass(frozen=True)
class TileConfig:
    """Tiles of the dense forward (k=None, or k > MAX_K_PAD)."""

    block_n: int
    block_t: int
    block_d: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return (f"BN={self.block_n},BT={self.block_t},BD={self.block_d},"
                f"w{self.num_warps}s{self.num_stages}")


# The k-loop of a tile reads BLOCK_D x 2 bytes per row for 16-bit inputs, 4 for fp32, 8 for fp64;
# the same 128 bytes per row per stage keeps loads vectorised and shared memory flat.
_BLOCK_D_BYTES = 128


def _block_d(x_dtype: torch.dtype) -> int:
    return max(16, _BLOCK_D_BYTES // (torch.finfo(x_dtype).bits // 8))


def k_pad_for(k: int) -> int:
    """Length of the running list: the power of 2 at or above k (at least MIN_K_PAD)."""
    return max(MIN_K_PAD, next_power_of_2(k))


def fwd_config(k: int, x_dtype: torch.dtype) -> FwdConfig | None:
    """Selection-kernel tiles for k and x's dtype; None when the dense fallback selects instead:
    k beyond the register budget, or fp64 (a packed int64 key cannot hold a double and an id, and
    ranking fp64 values rounded to fp32 breaks near-ties and values outside fp32's range)."""
    k_pad = k_pad_for(k)
    if k_pad > MAX_K_PAD or x_dtype == torch.float64:
        return None
    # The tile must hold K_PAD candidates. Its int64 keys, their top K_PAD and the running list
    # share the registers with the accumulator, so longer lists take fewer tokens per program;
    # fp32 (ieee, no tensor cores) dots hold more per thread, so they take 16 tokens.
    # Every choice here compiles without spills on sm_80 and sm_90 (see gpu_report_builds).
    if x_dtype in HALF:
        block_n = 64 if k_pad <= 64 else (32 if k_pad == 128 else 16)
        block_t, num_warps = max(k_pad, 128), 8
    else:
        block_n = 16
        block_t = max(k_pad, 128)
        num_warps = 8 if block_t > 128 else 4
    # fp32 ("ieee") dots run on the FMA units, so a deeper load pipeline buys little,
    # and its registers make ptxas spill.
    num_stages = 3 if x_dtype in HALF else 2
    return FwdConfig(block_n=block_n, block_t=block_t, block_d=_block_d(x_dtype), k_pad=k_pad,
                     num_warps=num_warps, num_stages=num_stages)


# The split-T merge holds two [MERGE_BLOCK_N, K_PAD] int64 lists and no accumulator.
MERGE_BLOCK_N = 16
MERGE_NUM_WARPS = 4


def dense_config(x_dtype: torch.dtype) -> TileConfig:
    """Dense-forward tiles for x's dtype."""
    size = 32 if x_dtype == torch.float64 else 64
    return TileConfig(block_n=size, block_t=size, block_d=_block_d(x_dtype), num_warps=4,
                      num_stages=3)


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of the backward kernels (all memory-bound gathers)."""

    pair_block_p: int = 32  # gathered x and W tiles carry a 64-bit address per element
    pair_block_d: int = 64
    dx_block_n: int = 32
    dx_block_d: int = 128
    dw_block_m: int = 16  # routed rows per block: MOLT gates spread pairs thinly over T
    dw_block_d: int = 128
    dw_group: int = 16  # blocks per dW program; more go to the chunk reduction
    num_warps: int = 4


BWD = BwdConfig()

# Gate backward cost rule: with T <= DENSE_GATE_BACKWARD_RATIO * k the dense pair of GEMMs
# dx = dpre W, dW = dpre^T x over a scattered [N, T] dpre does <= this many times the sparse
# path's FLOPs, but on tensor cores (~15x the FMA rate of the gathers on H100) and in 4 ops
# instead of a routing pass; beyond it the grouped sparse path (route + dW kernels) wins.
DENSE_GATE_BACKWARD_RATIO = 16


def split_count(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Programs per token block along T: enough to give every SM two programs."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one; splitting only adds the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, (2 * sms) // n_blocks))


# ----------------------------------------------------------------------------------------------
# lowrank_mixture: one grouped launch per phase over routing's block table

# tl.dot needs every dimension >= 16.
MIN_TILE = 16
# Output tile side (width) and rank tile: tensor-core dtypes take 128-wide width tiles (wgmma
# works per 64-row warpgroup) and 64-wide rank tiles; fp32 (ieee, FMA) and fp64 stop at 64 and
# 32 because their dots hold both operands' K slices in registers. The rank is a runtime loop
# bound over these tiles, so every bucket runs in the same launch.
WIDE_TILE = {"half": 128, "full": 64}
RANK_TILE = {"half": 64, "full": 32}
DEEP_TILE = {"half": 64, "full": 16}
# A block holds up to the expected rows of a segment (transform x token range): padding stays
# under about half the rows, while every block re-reads its transform's weights (from L2), so
# longer blocks win on these L2-bound kernels (``tools/schedule_sim.py``: at d=2304, k=32 the
# shrink's L2 bytes are mostly weights at BLOCK_M=32). The "ranges" combine stops at
# RANGES_BLOCK_M: 128-row blocks take half-width tiles (see ``expand``), which would
# double its programs past one wave.
MAX_BLOCK_M, RANGES_BLOCK_M = 128, 64
# Token ranges of the "ranges" combine: at most one wave of (range, width tile) programs on
# the GPU (PROGRAMS_PER_SM per SM; a 2nd, partial wave would double the kernel's time), each range
# at least RANGE_MIN_TOKENS tokens so its segments keep rows to fill a block. Plans made off the
# GPU (interpreter, gpu-report, cost model) assume DEFAULT_SMS (H100 SXM) unless told.
PROGRAMS_PER_SM, DEFAULT_SMS, RANGE_MIN_TOKENS, MAX_RANGES = 2, 132, 256, 64
# Working set a wave of programs may keep in L2: half the smallest L2 targeted (A100: 40 MB),
# leaving the rest for the weights streaming through and for imperfect replacement. The
# shrink and the atomic combine run their blocks in windows of token ranges whose gathered
# activation rows fit this budget, transform by transform within a window, so a row's k
# re-reads hit L2 and a transform's weights come from HBM once per window
# (``tools/cost_model.py`` simulates this).
L2_BUDGET_BYTES = 20 << 20
# Pairs routed per token at most, when a token offers more slots than this (k=None, the dense
# gate: [tokens, T] gates): buffers are sized by tokens x this bound, not tokens x T, and a
# device-side assert fires if a step activates more pairs than tokens x this bound.
MAX_MEAN_PAIRS_PER_TOKEN = 128
# Dense gates (slots = every transform) size blocks for this many active pairs per token (the
# paper's L0 range), not for the capacity above: blocks sized for 128 would run mostly padding.
DENSE_GATE_EXPECTED_L0 = 32
# Weight tensors one launch reads (one kernel argument each).
MAX_BUCKETS = 8
# The combine (a token's output = the sum of its pairs' (g) H @ W_t rows) comes in three kinds:
# - "fixed" (default below fp64): a program per (block, width tile) adds its rows as int32
#   fixed-point numbers with integer atomics. Integer addition is associative, so the result is
#   bitwise the same whatever order the adds land in. Each token row has its own power-of-2 scale
#   from a bound on the row's sum (pair norms x weight norms, kernels._fixed_scale), so the sum
#   never overflows and keeps FIXED_POINT_BITS bits against that bound.
# - "ranges" (fp64, where 31 bits are fewer than its 53): a program owns a token range's rows of a
#   width tile and read-modify-writes them, block by block, in table order.
# - "atomic" (opt-in, nondeterministic): as "fixed", with fp32 atomics; the order of the adds,
#   hence the rounding, varies between runs.
COMBINES = ("fixed", "ranges", "atomic")
FIXED_POINT_BITS = 30
# Tiles of the fixed combine's helper passes: the prologue (a program per transform: weight norms
# over width x rank tiles, the zero fill in BLOCK_N x BLOCK_K chunks) and the cast out (token rows
# x width tiles).
NORM_BLOCK_N, NORM_BLOCK_K = 64, 32
ROWS_BLOCK_T, ROWS_BLOCK_N = 32, 128
WARPS, BIG_WARPS, BIG_ACCUMULATOR_BYTES = 4, 8, 32 << 10


@dataclass(frozen=True)
class ArchTiles:
    """The decode's pipeline rules on one architecture: stages at most per kind, and the shared
    memory the stages of one block may take. fp32 (ieee, FMA) and fp64 take one stage: the fp32
    backward shrink at BLOCK_M=32 spills with two on sm_80, and a load pipeline buys little on
    the FMA path."""

    max_stages: dict[str, int]
    stage_bytes: int


# sm_80 allows 163 KiB of shared memory per block, sm_90 227 KiB: Hopper takes a fourth stage
# for tensor-core dtypes (wgmma's asynchronous loads hide more latency with a deeper pipeline).
# The CPU and the interpreter run sm_80's rules, so the kernel tests cover what sm_80 launches.
ARCH_TILES = {
    "sm_80": ArchTiles({"half": 3, "full": 1}, 128 << 10),
    "sm_90": ArchTiles({"half": 4, "full": 1}, 192 << 10),
}
ARCH_TILES["cpu"] = ARCH_TILES["sm_80"]
GPU_ARCHS = ("sm_80", "sm_90")


def default_combine(dtype: torch.dtype, deterministic: bool = True) -> str:
    """The combine for inputs of ``dtype`` (see COMBINES): "atomic" when determinism is waived,
    "ranges" for fp64, "fixed" otherwise."""
    if not deterministic:
        return "atomic"
    return "ranges" if dtype == torch.float64 else "fixed"


def _check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def arch_of(device: torch.device) -> str:
    """The config family of ``device``: "sm_90" for compute capability 9.x and up, "sm_80" for
    other CUDA devices, "cpu" otherwise (the CPU, the interpreter, meta)."""
    if device.type != "cuda":
        return "cpu"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"

# dU / dV (X^T Y) under skewed routing: a transform with more than XTY_CHUNK_ROWS routed rows is
# split into even chunks of at most that many rows, one program each, and a second pass sums a
# split transform's chunk partials in chunk order (deterministic). The partials (accumulator
# dtype) take at most XTY_PARTIAL_ELEMENTS elements, whatever the tokens and T: transforms past
# that budget (in transform order) stay whole.
XTY_CHUNK_ROWS = 1024
XTY_PARTIAL_ELEMENTS = 16 << 20
# The plan kernel scans XTY_PLAN_BLOCK_T transforms per step; the reduction gives each split
# transform XTY_REDUCE_PROGRAMS programs of XTY_REDUCE_BLOCK_E elements per step.
XTY_PLAN_BLOCK_T = 1024
XTY_REDUCE_BLOCK_E, XTY_REDUCE_PROGRAMS = 1024, 8


@dataclass(frozen=True)
class Launch:
    """Constexpr tile sizes plus warps and pipeline stages of one kernel launch."""

    tiles: dict[str, int]
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MixtureLayout:
    """Shape-only sizes of the decode's routing and rank-space buffers (the fake kernel, the
    launch code and the cost model agree on them).

    pair_capacity: pairs routed at most (tokens x min(slots, MAX_MEAN_PAIRS_PER_TOKEN));
    n_blocks: block-table length, pair_capacity // BLOCK_M + min(segments, pair_capacity);
    window_ranges: token ranges per L2 window (``L2_BUDGET_BYTES``);
    h_size: elements of h_pre (and g dH): min(n_blocks * BLOCK_M * r_max,
    pair_capacity * r_max + (BLOCK_M - 1) * n_ranges * sum of all ranks);
    combine: one of COMBINES (the "ranges" combine owns token ranges, the others do not).
    """

    block_m: int
    n_ranges: int
    range_tokens: int
    pair_capacity: int
    n_blocks: int
    h_size: int
    window_ranges: int
    combine: str

    @property
    def n_rows(self) -> int:
        return self.n_blocks * self.block_m


@dataclass(frozen=True)
class MixtureConfig:
    """Launch configs of the decode's kernels. Widths: shrink K, expand N, X^T Y output P."""

    layout: MixtureLayout
    shrink_fwd: Launch  # K = d_in
    expand_fwd: Launch  # N = d_out
    shrink_bwd: Launch  # K = d_out
    expand_bwd: Launch  # N = d_in
    grad_u: Launch  # P = d_out
    grad_v: Launch  # P = d_in
    xty_chunk_blocks: int  # blocks per X^T Y chunk of a split transform
    xty_partial_rows: int  # rank rows of chunk partials at most (XTY_PARTIAL_ELEMENTS / width)
    xty_plan: Launch
    xty_reduce: Launch
    fixed_prologue: Launch  # the fixed combine: weight norms per transform, zero fill
    fixed_finish: Launch  # its cast out


def _pow2_tile(size: int, cap: int) -> int:
    return min(cap, max(MIN_TILE, next_power_of_2(size)))


def _launch(
    kind: str, arch: ArchTiles, acc_shape: tuple[int, int], acc_bytes: int, stage_bytes: int,
    big: bool = False, **tiles: int,
) -> Launch:
    big = big or kind == "full" or acc_shape[0] * acc_shape[1] * acc_bytes >= BIG_ACCUMULATOR_BYTES
    warps = BIG_WARPS if big else WARPS
    return Launch(tiles, warps, max(1, min(arch.max_stages[kind], arch.stage_bytes // stage_bytes)))


def mixture_layout(
    n_tokens: int, n_slots: int, ranks: Sequence[int], counts: Sequence[int], d_out: int,
    dtype: torch.dtype, d_in: int | None = None, combine: str | None = None,
    sms: int = DEFAULT_SMS,
) -> MixtureLayout:
    """Block size, token ranges, L2 windows and buffer bounds from shapes only; ``combine`` None
    is ``default_combine(dtype)``.

    "ranges" combine: as many token ranges as one wave of its programs allows on ``sms`` SMs,
    grouped into L2 windows. "fixed" and "atomic" (no range ownership): each range is one L2
    window, as few as the budget allows, so segments (and blocks) stay long.
    """
    combine = combine or default_combine(dtype)
    _check_combine(combine)
    owned = combine == "ranges"
    n_transforms = sum(counts)
    kind = "half" if dtype in HALF else "full"
    pair_capacity = n_tokens * min(n_slots, n_transforms, MAX_MEAN_PAIRS_PER_TOKEN)
    # A window's gathered activation rows (d_in wide forward, d_out backward; x's dtype).
    row_bytes = max(d_in or d_out, d_out) * dtype.itemsize
    if owned:
        width_tiles = max(1, -(-d_out // _pow2_tile(d_out, WIDE_TILE[kind])))
        ranges = PROGRAMS_PER_SM * sms // width_tiles
    else:
        ranges = -(-n_tokens * row_bytes // L2_BUDGET_BYTES)
    n_ranges = max(1, min(MAX_RANGES, ranges, n_tokens // RANGE_MIN_TOKENS))
    range_tokens = max(1, -(-n_tokens // n_ranges))
    segments = n_transforms * n_ranges
    expected_pairs = n_tokens * (min(n_slots, DENSE_GATE_EXPECTED_L0)
                                 if n_slots >= n_transforms else min(n_slots, n_transforms))
    rows_per_segment = expected_pairs / max(segments, 1)
    m = 1 << max(0, int(math.floor(math.log2(max(rows_per_segment, 1.0)))))
    m = min(RANGES_BLOCK_M if owned else MAX_BLOCK_M, max(MIN_TILE, m))
    n_blocks = pair_capacity // m + min(segments, pair_capacity)
    r_max = max(ranks)
    rank_sum = sum(r * c for r, c in zip(ranks, counts))
    h_size = min(n_blocks * m * r_max, pair_capacity * r_max + (m - 1) * n_ranges * rank_sum)
    window_ranges = max(1, min(n_ranges, L2_BUDGET_BYTES // max(1, range_tokens * row_bytes)))
    # Windows pay when the activation rows' re-reads they keep in L2 outweigh the weights'
    # re-read per extra window (small token counts, huge weight sets: they do not).
    windows = -(-n_ranges // window_ranges)
    reread_rows = n_tokens * row_bytes * (expected_pairs / max(n_tokens, 1) - 1)
    if reread_rows <= rank_sum * row_bytes * (windows - 1):
        window_ranges = n_ranges
    return MixtureLayout(m, n_ranges, range_tokens, pair_capacity, n_blocks, h_size,
                         window_ranges, combine)


def mixture_config(
    n_tokens: int, n_slots: int, ranks: Sequence[int], counts: Sequence[int], d_in: int,
    d_out: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None,
    combine: str | None = None, sms: int = DEFAULT_SMS, arch: str = "cpu",
) -> MixtureConfig:
    """Every launch parameter of the decode, from shapes, the input dtype, the weights' dtype
    (None: the input's), the combine (one of COMBINES; None: ``default_combine(dtype)``), the
    GPU's SM count and the config family (``arch_of``; the layout is the same on every
    architecture)."""
    kind = "half" if dtype in HALF else "full"
    rules = ARCH_TILES[arch]
    layout = mixture_layout(n_tokens, n_slots, ranks, counts, d_out, dtype, d_in, combine, sms)
    m = layout.block_m
    wide, deep = WIDE_TILE[kind], DEEP_TILE[kind]
    elem, acc = dtype.itemsize, accumulator_dtype(dtype).itemsize
    tile_r = _pow2_tile(max(ranks), RANK_TILE[kind])

    fixed = layout.combine == "fixed"

    def shrink(k: int) -> Launch:
        bk = _pow2_tile(k, deep)
        return _launch(kind, rules, (m, tile_r), acc, (m * bk + bk * tile_r) * elem,
                       BLOCK_M=m, BLOCK_R=tile_r, BLOCK_K=bk)

    def expand(n: int) -> Launch:
        # 128 x 128 spills on sm_80 (the read-modify-write tile, or the atomics' 64-bit address
        # tile), so 128-row blocks take half-width tiles; with the fixed combine's scaling, so do
        # 64-row blocks (24 bytes on sm_80).
        half_width = m >= (MAX_BLOCK_M // 2 if fixed else MAX_BLOCK_M)
        bn = _pow2_tile(n, wide // 2 if half_width else wide)
        # The combine also holds the read-modify-write tile and the gated h tile: 8 warps
        # (4 spill on sm_80 and sm_90 at BLOCK_M 16 and 32).
        return _launch(kind, rules, (m, bn), acc, (m * tile_r + tile_r * bn) * elem, big=True,
                       BLOCK_M=m, BLOCK_N=bn, BLOCK_K=tile_r)

    def xty(p: int) -> Launch:
        bp, step = _pow2_tile(p, wide), min(m, deep)
        launch = _launch(kind, rules, (bp, tile_r), acc, (bp * step + step * tile_r) * elem,
                         BLOCK_M=m, BLOCK_P=bp, BLOCK_Q=tile_r, BLOCK_K=step)
        if dtype == torch.float32:
            # fp32 X^T Y (FMA dot, 64 x 32 accumulator): 8 warps spill 8 bytes on sm_80, 4 do not.
            launch = Launch(launch.tiles, WARPS, launch.num_stages)
        return launch

    shrink_bwd, expand_fwd = shrink(d_out), expand(d_out)
    if fixed and kind == "full" and m < MAX_BLOCK_M // 2:
        # The fixed combine's pair-bound epilogue: the fp32 backward shrink at BLOCK_M 32 spills
        # 8 bytes with 8 warps on sm_80 (ptxas keeps 64 registers a thread), none with 4.
        shrink_bwd = Launch(shrink_bwd.tiles, WARPS, shrink_bwd.num_stages)
    if weight_dtype is not None and weight_dtype.itemsize > elem:
        # fp32 master weights under half x: the backward shrink casts each [BLOCK_K, BLOCK_R] tile
        # of U (rank-contiguous, a runtime stride: loaded element by element) in registers, and a
        # load pipeline keeps stages of it live: 2-3 stages spill 4-128 bytes on sm_80 and sm_90
        # at every BLOCK_M, one stage none (gpu-report).
        shrink_bwd = Launch(shrink_bwd.tiles, shrink_bwd.num_warps, 1)
        if m == MAX_BLOCK_M:
            # The forward combine reads U the same way; at 128-row blocks (the atomic combine)
            # 2-3 stages spill 16-24 bytes on sm_80, one stage none (gpu-report).
            expand_fwd = Launch(expand_fwd.tiles, expand_fwd.num_warps, 1)
    return MixtureConfig(layout, shrink(d_in), expand_fwd, shrink_bwd, expand(d_in),
                         xty(d_out), xty(d_in), max(1, XTY_CHUNK_ROWS // m),
                         XTY_PARTIAL_ELEMENTS // max(d_in, d_out, 1),
                         Launch({"BLOCK_T": XTY_PLAN_BLOCK_T}, WARPS, 1),
                         Launch({"BLOCK_E": XTY_REDUCE_BLOCK_E}, WARPS, 1),
                         Launch({"BLOCK_N": NORM_BLOCK_N, "BLOCK_K": NORM_BLOCK_K}, WARPS, 1),
                         Launch({"BLOCK_T": ROWS_BLOCK_T, "BLOCK_N": ROWS_BLOCK_N}, WARPS, 1))


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (DEFAULT_SMS elsewhere: the interpreter, meta and CPU tensors)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(
    n_tokens: int, n_slots: int, U: Sequence[Tensor], V: Sequence[Tensor], dtype: torch.dtype,
    combine: str | None = None, arch: str | None = None,
) -> MixtureConfig:
    """The decode's MixtureConfig for these weights (shapes and device only) with ``combine``
    (None: ``default_combine(dtype)``) on ``arch`` (default: the weights' device, see
    ``arch_of``)."""
    if len(V) > MAX_BUCKETS:
        raise ValueError(f"the triton decode takes at most {MAX_BUCKETS} rank buckets, "
                         f"got {len(V)}")
    ranks = [v.shape[1] for v in V]
    counts = [v.shape[0] for v in V]
    return mixture_config(n_tokens, n_slots, ranks, counts, V[0].shape[2], U[0].shape[1], dtype,
                          U[0].dtype, combine, sm_count(V[0].device),
                          arch or arch_of(V[0].device))


# ----------------------------------------------------------------------------------------------
# Autotuning the decode (opt-in: MOLT_KERNELS_AUTOTUNE=1)
#
# The first decode of a (arch, dtype, rank class, routing size class, widths) key times every
# candidate Tuning on its own inputs (forward + backward kernels; the launch code supplies the
# timer) and keeps the fastest; later calls with the key reuse it. A Tuning changes warps,
# stages and the X^T Y chunk size only, never the layout, so buffer sizes (and the op's fake
# shapes) do not depend on it. Tuning synchronises the device: tune before capturing a graph.

AUTOTUNE_ENV = "MOLT_KERNELS_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether ``MOLT_KERNELS_AUTOTUNE`` is set to 1 (read at every call)."""
    return os.environ.get(AUTOTUNE_ENV, "0") == "1"


@dataclass(frozen=True)
class Tuning:
    """Launch knobs the autotuner varies; None keeps the architecture's default."""

    num_warps: int | None = None
    num_stages: int | None = None
    xty_chunk_rows: int | None = None


TuningKey = tuple[str, str, int, int, int, int]


def tuning_key(
    arch: str, dtype: torch.dtype, ranks: Sequence[int], n_tokens: int, n_slots: int,
    n_transforms: int, d_in: int, d_out: int,
) -> TuningKey:
    """(arch, dtype, rank class = max rank rounded up to a power of 2, routing size class =
    log2 of the pairs routed at most (rounded up), d_in, d_out)."""
    pairs = n_tokens * min(n_slots, n_transforms, MAX_MEAN_PAIRS_PER_TOKEN)
    return (arch, str(dtype).removeprefix("torch."), next_power_of_2(max(ranks)),
            max(0, pairs - 1).bit_length(), d_in, d_out)


def tuning_candidates(cfg: MixtureConfig) -> list[Tuning]:
    """The default first, then 4 and 8 warps, one stage fewer and more, half and twice the
    X^T Y chunk; duplicates of the default dropped."""
    stages = max(launch.num_stages for launch in _phases(cfg))
    others = [Tuning(num_warps=WARPS), Tuning(num_warps=BIG_WARPS)]
    others += [Tuning(num_stages=s) for s in (stages - 1, stages + 1) if s >= 1]
    others += [Tuning(xty_chunk_rows=r) for r in (XTY_CHUNK_ROWS // 2, XTY_CHUNK_ROWS * 2)]
    return [Tuning()] + [t for t in dict.fromkeys(others) if apply_tuning(cfg, t) != cfg]


def _phases(cfg: MixtureConfig) -> tuple[Launch, ...]:
    return tuple(getattr(cfg, name) for name in _PHASE_NAMES)


def apply_tuning(cfg: MixtureConfig, tuning: Tuning) -> MixtureConfig:
    """``cfg`` with the knobs of ``tuning`` on its six grouped launches (layout unchanged)."""

    def tuned(launch: Launch) -> Launch:
        return Launch(launch.tiles, tuning.num_warps or launch.num_warps,
                      tuning.num_stages or launch.num_stages)

    chunk = cfg.xty_chunk_blocks
    if tuning.xty_chunk_rows is not None:
        chunk = max(1, tuning.xty_chunk_rows // cfg.layout.block_m)
    return replace(cfg, **{name: tuned(getattr(cfg, name)) for name in _PHASE_NAMES},
                   xty_chunk_blocks=chunk)


_PHASE_NAMES = ("shrink_fwd", "expand_fwd", "shrink_bwd", "expand_bwd", "grad_u", "grad_v")
_TUNED: dict[TuningKey, Tuning] = {}


def autotune(
    key: TuningKey, candidates: Sequence[Tuning], seconds: Callable[[Tuning], float] | None
) -> Tuning:
    """The cached Tuning of ``key``; on a miss with a timer, the candidate with the fewest
    ``seconds`` (the first on ties; one that raises, e.g. out of shared memory, loses), cached.
    Without a timer a miss gives the default."""
    if key in _TUNED:
        return _TUNED[key]
    if seconds is None:
        return Tuning()
    timed = []
    for candidate in candidates:
        try:
            timed.append(seconds(candidate))
        except Exception:  # noqa: BLE001 - a candidate that cannot launch is not the fastest
            timed.append(math.inf)
    best = candidates[min(range(len(candidates)), key=timed.__getitem__)]
    _TUNED[key] = best
    return best


def clear_tuning_cache() -> None:
    """Forget every tuned key (tests; a new device)."""
    _TUNED.clear()
