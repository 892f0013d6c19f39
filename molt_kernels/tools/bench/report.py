"""Tables, plots and JSON of a benchmark run."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...layers.flops import (
    BACKWARD_PER_FORWARD,
    molt_cost,
    transcoder_cost,
)
from ...layers.transcoder import TranscoderConfig
from .measure import MIB, CaseInfo, Result
from .workload import MODES, REFERENCE, TRANSCODER, BenchCase

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


def _cell_model(r: Result | None) -> str:
    """MODELED ms and measured / modeled, or "-" where the model does not cover the row."""
    if r is None or r.modeled_s is None:
        return "-"
    ratio = "" if r.time_s is None else f" ({r.time_s / r.modeled_s:.2f}x)"
    return f"{r.modeled_s * 1e3:.2f}{ratio}"


def main_table(results: Sequence[Result], impls: Sequence[str]) -> str:
    """One row per (config, implementation), forward and forward+backward side by side; with the
    cost model's prediction (MODELED ms, measured/modeled) where a row has one."""
    modeled = any(r.modeled_s is not None for r in results)
    headers = [
        "config", "impl", "FLOP/tok fwd", "fwd ms", "f+b ms", "f+b/fwd",
        "useful GFLOP/s fwd (of mm)", "useful GFLOP/s f+b (of mm)", "fwd MiB", "f+b MiB",
        "speed-up fwd", "speed-up f+b", "of FLOP ratio fwd", "of FLOP ratio f+b",
    ]  # fmt: skip
    if modeled:
        headers += ["MODELED fwd ms (meas/model)", "MODELED f+b ms (meas/model)"]
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
            ] + ([_cell_model(f), _cell_model(b)] if modeled else []))  # fmt: skip
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
                *(
                    [f"{report['contend']} busy processes beside it"]
                    if report.get("contend")
                    else []
                ),
                *(f"{k}={v}" for k, v in report["environment"].items() if v is not None),
            ]
        ),
        *(
            [
                f"MODELED columns: the roofline cost model (tools/cost_model.py, bf16) on "
                f"{report['cost_model_gpu']}'s datasheet numbers; (meas/model) = measured / modeled"
            ]
            if report.get("cost_model_gpu")
            else []
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
