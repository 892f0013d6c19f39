"""``python -m molt_kernels flops``: parameters and matmul FLOPs per token of MOLTs, their dense
reference, their parameter-matched transcoder and a dense MLP (accounting in ``layers.flops``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import product

from ..layers.config import MOLTConfig
from ..layers.flops import (
    MLP_RATIO,
    matched_transcoder,
    mlp_cost,
    molt_cost,
    molt_reference_cost,
    transcoder_cost,
)
from .bench.cli import int_list
from .bench.report import render_table
from .bench.workload import GRID_D, GRID_K, GRID_N


def flops_table(
    d: Sequence[int], n: Sequence[int], k: Sequence[int], mlp_ratio: int = MLP_RATIO
) -> str:
    """Parameters and forward FLOPs per token of MOLTs (paper allocation, uniform routing), their
    dense reference, their matched transcoder and a dense MLP, as a Markdown table."""
    headers = [
        "d", "N", "k", "T", "sum(r)", "params", "MOLT fwd", "reference fwd", "TC F / k",
        "TC fwd", "TC / MOLT", f"MLP({mlp_ratio}d) fwd",
    ]  # fmt: skip
    rows = []
    for d_, n_, k_ in product(d, n, k):
        full = MOLTConfig.paper(d_, n_, None)
        if k_ > full.n_transforms:
            continue
        cfg = MOLTConfig.paper(d_, n_, k_)
        tc = matched_transcoder(cfg)
        molt, tc_cost = molt_cost(cfg).forward, transcoder_cost(tc).forward
        rows.append([
            d_, n_, k_, cfg.n_transforms, cfg.total_rank, f"{cfg.n_parameters():,}",
            f"{molt:,.0f}", f"{molt_reference_cost(cfg).forward:,.0f}",
            f"{tc.n_features} / {tc.k}", f"{tc_cost:,.0f}", f"{tc_cost / molt:.1f}",
            f"{mlp_cost(d_, mlp_ratio * d_).forward:,.0f}",
        ])  # fmt: skip
    return render_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m molt_kernels flops``: print :func:`flops_table` for a grid of configs."""
    parser = argparse.ArgumentParser(
        prog="molt_kernels flops",
        description="Parameters and matmul FLOPs per token (forward; backward is 2x) of MOLTs, "
        "their dense reference, their parameter-matched TopK transcoder and a dense MLP.",
    )
    parser.add_argument("--d", type=int_list, default=GRID_D, help=f"widths (default {GRID_D})")
    parser.add_argument("--n", type=int_list, default=GRID_N, help=f"N (default {GRID_N})")
    parser.add_argument("--k", type=int_list, default=GRID_K, help=f"top-k (default {GRID_K})")
    parser.add_argument("--mlp-ratio", type=int, default=MLP_RATIO, help="MLP width / d")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(flops_table(args.d, args.n, args.k, args.mlp_ratio))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
