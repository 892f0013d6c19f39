"""The low-rank mixture op alone (gates and indices precomputed by the layer's gate), forward
(no_grad) and forward+backward into x, the gates, U, V and b_dec, on every native backend."""

import torch

import molt_kernels.layers.functional as MF
from molt_kernels.tools.bench import make_inputs, make_molt


def test_lowrank_mixture(benchmark, run, case, device, dtype, backend, mode):
    cfg = case.molt_config()
    layer = make_molt(cfg, device, dtype)
    x, grad_y = make_inputs(case.tokens, cfg.d_in, cfg.d_out, device, dtype)
    with torch.no_grad():
        gates, indices = layer.encode(x)
    gates.requires_grad_()
    U, V = list(layer.U), list(layer.V)
    leaves = [x, gates, *layer.parameters()]

    def forward():
        return MF.lowrank_mixture(x, gates, indices, U, V, layer.b_dec, backend)

    def step():
        if mode == "forward":
            with torch.no_grad():
                forward()
            return
        for t in leaves:
            t.grad = None
        forward().backward(grad_y)

    benchmark.group = f"lowrank_mixture {mode} {case.name}"
    run(step)
