"""Accuracy of the triton decode's three combines against the float64 reference (CPU, under
TRITON_INTERPRET=1): the relative error (Frobenius) of y and dx for fp32 and bf16 inputs on a
Zipf-routed layer with ranks 32 to 512.

    TRITON_INTERPRET=1 python bench/combine_precision.py

bf16 outputs: the fixed and ranges combines cast y and dx to bf16 inside a kernel, the atomic one
with torch after it. Triton 3.9's interpreter truncates an fp32 -> bf16 cast (the GPU rounds to
nearest even), so under the interpreter those two show a larger bf16 error than the atomic one;
that gap is the interpreter's, not the combine's.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from molt_kernels.ops import configs  # noqa: E402
from molt_kernels.ops.lowrank_mixture import launch  # noqa: E402
from molt_kernels.ops.lowrank_mixture.reference import lowrank_mixture_reference  # noqa: E402

RANK_COUNTS, D_IN, D_OUT, TOKENS, K = {512: 2, 64: 6, 32: 8}, 96, 80, 300, 6


def layer(dtype: torch.dtype, gen: torch.Generator) -> dict:
    n_t = sum(RANK_COUNTS.values())
    zipf = -1.2 * torch.log1p(torch.randperm(n_t, generator=gen).float())
    gumbel = -torch.log(-torch.log(torch.rand(TOKENS, n_t, generator=gen)))
    return dict(
        x=torch.randn(TOKENS, D_IN, generator=gen).to(dtype),
        gates=torch.randn(TOKENS, K, generator=gen),
        indices=(zipf + gumbel).topk(K, dim=1).indices,
        U=[(torch.randn(c, D_OUT, r, generator=gen) / r**0.5).to(dtype)
           for r, c in RANK_COUNTS.items()],
        V=[(torch.randn(c, r, D_IN, generator=gen) / D_IN**0.5).to(dtype)
           for r, c in RANK_COUNTS.items()],
        b_dec=torch.randn(D_OUT, generator=gen).to(dtype),
        grad_y=torch.randn(TOKENS, D_OUT, generator=gen),
    )


def reference(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs["x"].double().requires_grad_()
    y = lowrank_mixture_reference(x, inputs["gates"].double(), inputs["indices"],
                                  [u.double() for u in inputs["U"]],
                                  [v.double() for v in inputs["V"]], inputs["b_dec"].double())
    (dx,) = torch.autograd.grad(y, x, inputs["grad_y"].double())
    return y.detach(), dx


def triton_combine(inputs: dict, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (inputs["x"], inputs["gates"], inputs["indices"], inputs["U"], inputs["V"])
    cfg = configs.plan(TOKENS, K, inputs["U"], inputs["V"], inputs["x"].dtype, combine)
    y, table, h_pre = launch.forward(*args, inputs["b_dec"], cfg=cfg)
    dx, *_ = launch.backward(inputs["grad_y"].to(y.dtype), *args[:2], table, *args[3:], h_pre,
                             (True, False, False, False), cfg=cfg)
    return y, dx


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def main() -> None:
    print("dtype     combine  y rel err  dx rel err")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = layer(dtype, torch.Generator().manual_seed(0))
        y_ref, dx_ref = reference(inputs)
        for combine in configs.COMBINES:
            y, dx = triton_combine(inputs, combine)
            print(f"{str(dtype).removeprefix('torch.'):<9} {combine:<8} "
                  f"{rel_err(y, y_ref):.2e}   {rel_err(dx, dx_ref):.2e}")


if __name__ == "__main__":
    main()
