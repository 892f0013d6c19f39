"""`python -m molt_kernels verify`: randomized configs through every available backend against the
float64 reference, forward and all gradients; prints a table and exits non-zero on any mismatch."""

from __future__ import annotations

import argparse
import random
import sys

import torch

from ..layers.backend import available_backends
from ..layers.config import MOLTConfig
from ..layers.molt import MOLT
from ..ops.gate_topk.activation import ACTIVATIONS
from .testing import TOLERANCE, compare_to_reference

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def random_config(rng: random.Random) -> MOLTConfig:
    """A small random MOLT: 1-4 buckets of arbitrary (not only power-of-two) ranks, sometimes
    with the norm-scaled gate, no decoder bias or standardisation (at its identity init)."""
    n_buckets = rng.randint(1, 4)
    ranks = rng.sample(range(1, 40), n_buckets)
    rank_counts = {r: rng.randint(1, 9) for r in ranks}
    n_transforms = sum(rank_counts.values())
    k = None if rng.random() < 0.2 else rng.randint(1, n_transforms)
    d_in = rng.choice([1, 5, 16, 33])
    d_out = d_in if rng.random() < 0.5 else rng.choice([1, 7, 24])
    return MOLTConfig(
        d_in=d_in,
        d_out=d_out,
        rank_counts=rank_counts,
        k=k,
        activation=rng.choice(ACTIVATIONS),
        jumprelu_bandwidth=0.5,
        scale_gate_by_norm=rng.random() < 0.3,
        standardize=rng.random() < 0.2,
        decoder_bias=rng.random() < 0.8,
    )


def describe(cfg: MOLTConfig) -> str:
    ranks = ",".join(f"{r}x{c}" for r, c in cfg.rank_counts.items())
    options = "".join(
        f" {flag}"
        for flag, on in (
            ("norm", cfg.scale_gate_by_norm),
            ("std", cfg.standardize),
            ("nobias", not cfg.decoder_bias),
        )
        if on
    )
    return f"d={cfg.d_in}->{cfg.d_out} ranks={ranks} k={cfg.k} {cfg.activation}{options}"


def run(n_configs: int, seed: int, backends: list[str], dtypes: list[str], device: str) -> int:
    rng = random.Random(seed)
    header = f"{'config':<58} {'tokens':>6} {'backend':>8} {'dtype':>9} {'max rel err':>12} status"
    print(header)
    print("-" * len(header))
    failures = 0
    for i in range(n_configs):
        cfg = random_config(rng)
        torch.manual_seed(seed * 1000 + i)
        layer = MOLT(cfg, device=device, dtype=torch.float64)
        n_tokens = rng.choice([0, 1, 7, 23])
        x = torch.randn(n_tokens, cfg.d_in, dtype=torch.float64, device=device)
        for backend in backends:
            for name in dtypes:
                dtype = DTYPES[name]
                errors = compare_to_reference(layer, x, backend, dtype, seed=i)
                worst = max(errors, key=errors.get)
                ok = errors[worst] <= TOLERANCE[dtype]
                failures += not ok
                status = "ok" if ok else f"FAIL ({worst})"
                print(
                    f"{describe(cfg):<58} {n_tokens:>6} {backend:>8} {name:>9} "
                    f"{errors[worst]:>12.2e} {status}"
                )
    print(f"\n{failures} mismatches" if failures else "\nall backends match the reference")
    return 1 if failures else 0


def _parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The --device as a torch.device that exists here; otherwise a one-line usage error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be a torch device such as cpu or cuda:0, got {name!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molt_kernels verify", description=__doc__)
    parser.add_argument("--configs", type=int, default=12, help="random configs to check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", help="comma list (default: every available non-reference)")
    parser.add_argument("--dtypes", default="float64,float32", help=f"comma list of {list(DTYPES)}")
    args = parser.parse_args(argv)
    if args.configs < 1:
        parser.error(f"--configs must be >= 1 (0 configs would check nothing), got {args.configs}")
    device = _parse_device(parser, args.device)
    available = [b for b in available_backends(device) if b != "reference"]
    backends = args.backends.split(",") if args.backends else available
    unknown = [b for b in backends if b not in available]
    if unknown:
        parser.error(f"backends {unknown} are not available on {device}; available: {available}")
    dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes must be from {list(DTYPES)}")
    return run(args.configs, args.seed, backends, dtypes, args.device)


if __name__ == "__main__":
    sys.exit(main())
