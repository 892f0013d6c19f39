"""The whole MOLT layer on every native backend and its matched TopK transcoder, forward (no_grad)
and forward+backward; grouped by mode so that each table compares them directly."""

from molt_kernels.layers.flops import (
    matched_transcoder,
    molt_cost,
    molt_reference_cost,
    transcoder_cost,
)
from molt_kernels.tools.bench import (
    make_inputs,
    make_molt,
    make_transcoder,
    measure_routing,
    native_backends,
    sparse_backend,
    step_fn,
)


def _flops(cost, mode, tokens):
    per_token = cost.forward if mode == "forward" else cost.forward_backward
    return per_token * tokens


def test_molt_layer(benchmark, run, case, device, dtype, backend, mode):
    cfg = case.molt_config()
    layer = make_molt(cfg, device, dtype)
    layer.backend = backend
    x, grad_y = make_inputs(case.tokens, cfg.d_in, cfg.d_out, device, dtype)
    benchmark.group = f"layer {mode} {case.name}"
    benchmark.extra_info["active_transforms"], active_rank = measure_routing(layer, x)
    cost = molt_reference_cost(cfg) if backend == "reference" else molt_cost(cfg, active_rank)
    benchmark.extra_info["flops"] = _flops(cost, mode, case.tokens)
    run(step_fn(layer, x, grad_y, mode))


def test_matched_transcoder(benchmark, run, case, device, dtype, mode):
    tcfg = matched_transcoder(case.molt_config())
    layer = make_transcoder(tcfg, sparse_backend(native_backends(device)), device, dtype)
    x, grad_y = make_inputs(case.tokens, tcfg.d_in, tcfg.d_out, device, dtype)
    benchmark.group = f"layer {mode} {case.name}"
    benchmark.extra_info["flops"] = _flops(transcoder_cost(tcfg), mode, case.tokens)
    benchmark.extra_info["n_features"] = tcfg.n_features
    run(step_fn(layer, x, grad_y, mode))
