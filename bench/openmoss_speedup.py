"""Speed-up of a converted OpenMOSS MOLT over OpenMOSS's own dense forward, on the CPU.

    python bench/openmoss_speedup.py [--d 768] [--n 4] [--k 8] [--tokens 8192] [--repeats 5]

An OpenMOSS MOLT (the paper allocation, act_fn "topk", sparsity_include_decoder_norm on, the
defaults of their config) is written with random weights in their format and read back twice:
as their ``MixtureOfLinearTransform`` computes it (``OpenMossDenseMOLT`` below, reimplemented
from their math: the encoder with decoder-norm scaling, every transform for every token, then
the top-k mask) and converted by ``molt_kernels.interop.load_openmoss`` (torch backend). Both run
in fp32 on one thread; the runs alternate so that both see the same machine load. Reports the
median time of forward (no_grad) and forward+backward, the min-max spread, the ratio of wall
times and of process CPU times, the peak memory of one run each, the agreement of the outputs
and the load average before and after.
The converted layer's forward is timed twice: computing the gate's transform norms on every call
(training, where the weights change every step), and with them cached (inference).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from molt_kernels.interop import load_openmoss, save_openmoss
from molt_kernels.layers.config import MOLTConfig
from molt_kernels.layers.molt import MOLT
from molt_kernels.tools.bench.measure import run_with_peak
from molt_kernels.tools.bench.workload import step_fn

SEED = 0


class OpenMossDenseMOLT(nn.Module):
    """OpenMOSS's MOLT forward (``encode`` then ``_decode_single_gpu``), as their code computes it.

    encode: hidden_pre = x @ W_E + b_E, times decoder_norm(); relu then a top-k mask; divided by
    decoder_norm() (and hidden_pre too, as theirs does for its return value), where decoder_norm()
    forms every U_t V_t with bmm and takes its Frobenius norm, each of the three times it is
    called. decode: per rank bucket (ascending), x V^T for every transform, times the
    activations, then U: a [tokens, count, rank] tensor per bucket whatever the sparsity.
    """

    def __init__(self, tensors: dict[str, Tensor], top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.ranks = sorted(int(n.split(".")[1]) for n in tensors if n.startswith("U_matrices."))
        self.W_E = nn.Parameter(tensors["W_E"].clone())
        self.b_E = nn.Parameter(tensors["b_E"].clone())
        self.U_matrices = nn.ParameterDict(
            {str(r): nn.Parameter(tensors[f"U_matrices.{r}"].clone()) for r in self.ranks}
        )
        self.V_matrices = nn.ParameterDict(
            {str(r): nn.Parameter(tensors[f"V_matrices.{r}"].clone()) for r in self.ranks}
        )
        self.b_D = nn.Parameter(tensors["b_D"].clone())

    def decoder_norm(self) -> Tensor:
        norms = []
        for r in self.ranks:
            uv = torch.bmm(self.U_matrices[str(r)], self.V_matrices[str(r)])
            norms.append(torch.norm(uv.view(uv.shape[0], -1), p="fro", dim=1))
        return torch.cat(norms)

    def encode(self, x: Tensor) -> Tensor:
        hidden_pre = x @ self.W_E + self.b_E
        hidden_pre = hidden_pre * self.decoder_norm()
        acts = hidden_pre * hidden_pre.gt(0).to(hidden_pre.dtype)
        with torch.no_grad():
            kept = torch.zeros_like(acts, dtype=torch.bool)
            kept.scatter_(-1, acts.topk(self.top_k, dim=-1, sorted=False).indices, True)
        acts = acts * kept.to(acts.dtype)
        acts = acts / self.decoder_norm()
        hidden_pre = hidden_pre / self.decoder_norm()  # part of their encode's work
        return acts

    def forward(self, x: Tensor) -> Tensor:
        acts = self.encode(x)
        y = torch.zeros_like(x)
        start = 0
        for r in self.ranks:
            U, V = self.U_matrices[str(r)], self.V_matrices[str(r)]
            count = V.shape[0]
            vx = torch.einsum("... d, c r d -> ... c r", x, V)
            weighted = acts[..., start : start + count].unsqueeze(-1) * vx
            y = y + torch.einsum("... c r, c d r -> ... d", weighted, U)
            start += count
        return y + self.b_D


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def alternate(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """{step: {"wall": seconds, "cpu": process CPU seconds}} over ``repeats`` rounds, the steps
    interleaved within each round. On one thread the CPU time is the work itself; it moves
    much less than the wall time when other processes share the cores."""
    times = {name: {"wall": [], "cpu": []} for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            if round_ >= warmup:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def speedup(theirs: list[float], ours: list[float]) -> str:
    """Ratio of the medians, with the extreme ratios of the runs in brackets."""
    ratio = statistics.median(theirs) / statistics.median(ours)
    return f"{ratio:.1f}x ({min(theirs) / max(ours):.1f}-{max(theirs) / min(ours):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(SEED)
    cfg = MOLTConfig.paper(args.d, args.n, args.k, scale_gate_by_norm=True)
    print(
        f"load average before: {load_average()} ({os.cpu_count()} CPUs), "
        f"{torch.get_num_threads()} torch thread(s), fp32"
    )
    with tempfile.TemporaryDirectory() as tmp:
        # A MOLT in OpenMOSS's format: written, then read back by both sides.
        save_openmoss(MOLT(cfg), tmp, hook_point_in="hook_in", hook_point_out="hook_out")
        theirs = OpenMossDenseMOLT(load_file(str(Path(tmp) / "sae_weights.safetensors")), args.k)
        ours = load_openmoss(tmp, backend="torch")
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.tokens, args.d, generator=gen).requires_grad_(True)
    grad_y = torch.randn(args.tokens, args.d, generator=gen)
    with torch.no_grad():
        y_theirs, y_ours = theirs(x), ours(x)
    agreement = ((y_ours - y_theirs).norm() / y_theirs.norm()).item()
    print(
        f"config: d={args.d} N={args.n} (T={cfg.n_transforms}, ranks {sorted(cfg.ranks)}) "
        f"k={args.k}, {args.tokens} tokens; ||y_ours - y_theirs|| / ||y_theirs|| = "
        f"{agreement:.2e}"
    )
    rows = []
    # Ours recomputes n_t = ||U_t V_t||_F on every call (as training must, the weights change
    # every step) unless inside cached_gate_norms() (inference with fixed weights). Theirs
    # recomputes it three times per call in any case.
    for label, mode, cached in (
        ("forward", "forward", False),
        ("forward, n_t cached", "forward", True),
        ("forward+backward", "forward_backward", False),
    ):
        steps = {
            name: step_fn(layer, x, grad_y, mode)
            for name, layer in (("openmoss", theirs), ("ours", ours))
        }
        with ours.cached_gate_norms() if cached else contextlib.nullcontext():
            peaks = {n: run_with_peak(step, torch.device("cpu"))[1] for n, step in steps.items()}
            times = alternate(steps, args.repeats)
        rows.append((label, times, peaks))
    print(f"load average after: {load_average()}")
    print(
        "| mode | OpenMOSS dense, ms wall (min-max) | converted (torch backend), ms wall "
        "(min-max) | speed-up, wall | speed-up, CPU time | peak MiB OpenMOSS / ours |"
    )
    print("|---|---|---|---|---|---|")
    for label, times, peaks in rows:
        cells = []
        for name in ("openmoss", "ours"):
            wall = times[name]["wall"]
            cells.append(
                f"{1e3 * statistics.median(wall):.0f} ({1e3 * min(wall):.0f}-{1e3 * max(wall):.0f})"
            )
        ratios = [speedup(times["openmoss"][c], times["ours"][c]) for c in ("wall", "cpu")]
        peak = " / ".join(
            "?" if peaks[n] is None else f"{peaks[n] / 2**20:.0f}" for n in ("openmoss", "ours")
        )
        print(f"| {label} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} | {peak} |")
    return 0 if agreement < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
