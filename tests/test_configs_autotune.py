"""Per-architecture decode configs and the opt-in autotuner: candidates, cache key, a fake timer
choosing a config, the cache hit, and the tuned config in a real decode under the interpreter."""

import pytest
import torch

from molt_kernels.ops import configs
from molt_kernels.tools.gpu_report import config_family

PAPER = dict(ranks=(512, 256, 128, 64, 32), counts=(2, 4, 8, 16, 32))


def _config(arch: str, n_tokens: int = 16384, dtype: torch.dtype = torch.bfloat16):
    return configs.mixture_config(n_tokens, 8, PAPER["ranks"], PAPER["counts"], 2304, 2304,
                                  dtype, arch=arch)


def test_configs_per_architecture() -> None:
    sm80, sm90, cpu = (_config(arch) for arch in ("sm_80", "sm_90", "cpu"))
    assert cpu == sm80  # the interpreter runs (and the tests check) what sm_80 launches
    assert sm90.layout == sm80.layout  # buffer sizes never depend on the architecture
    stages = [(a.num_stages, b.num_stages) for a, b in zip(configs._phases(sm80),
                                                             configs._phases(sm90))]
    assert all(s90 >= s80 for s80, s90 in stages) and max(s90 for _, s90 in stages) == 4
    # fp32 and fp64 keep one stage everywhere.
    assert all(launch.num_stages == 1
               for launch in configs._phases(_config("sm_90", dtype=torch.float32)))


def test_arch_of(monkeypatch) -> None:
    assert configs.arch_of(torch.device("cpu")) == "cpu"
    for capability, arch in (((9, 0), "sm_90"), ((10, 0), "sm_90"), ((8, 6), "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert configs.arch_of(torch.device("cuda")) == arch
        assert config_family(f"sm_{capability[0]}{capability[1]}") == arch


def test_tuning_key_classes() -> None:
    def key(n_tokens: int, ranks=(48, 32), arch="sm_90", dtype=torch.bfloat16):
        return configs.tuning_key(arch, dtype, ranks, n_tokens, 8, 40, 256, 128)

    assert key(1000) == ("sm_90", "bfloat16", 64, 13, 256, 128)  # 8000 pairs -> 2^13
    assert key(1000) == key(1024)  # same routing size class
    assert key(1000) != key(1025)  # 8200 pairs: the next class
    assert key(1000) != key(1000, ranks=(512, 32))  # rank class
    assert key(1000) != key(1000, arch="sm_80") != key(1000, dtype=torch.float32)


def test_candidates_keep_the_layout() -> None:
    cfg = _config("sm_80")
    candidates = configs.tuning_candidates(cfg)
    assert candidates[0] == configs.Tuning()
    tuned = [configs.apply_tuning(cfg, t) for t in candidates]
    assert tuned[0] == cfg and all(c.layout == cfg.layout for c in tuned)
    assert len(candidates) >= 5 and all(c != cfg for c in tuned[1:])
    assert len({repr(c) for c in tuned}) == len(tuned)  # no two candidates launch alike


def test_fake_timer_picks_the_fastest_and_the_cache_hits() -> None:
    configs.clear_tuning_cache()
    candidates = [configs.Tuning(), configs.Tuning(num_warps=4), configs.Tuning(num_stages=2)]
    seconds = {candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: 2.0}
    calls = []

    def timer(tuning):
        calls.append(tuning)
        if tuning.num_stages == 2:
            raise RuntimeError("out of shared memory")  # loses, does not abort the tuning
        return seconds[tuning]

    key = ("sm_90", "bfloat16", 64, 13, 256, 128)
    assert configs.autotune(key, candidates, timer) == candidates[1]
    assert calls == candidates
    assert configs.autotune(key, candidates, timer) == candidates[1]
    assert len(calls) == 3  # cached: no second timing
    assert configs.autotune(("cpu",) + key[1:], candidates, None) == configs.Tuning()
    configs.clear_tuning_cache()


def test_tuned_config_drives_the_decode(monkeypatch) -> None:
    """MOLT_KERNELS_AUTOTUNE=1 under the interpreter with a fake timer that prefers 8 warps: the
    forward tunes once, the backward and a second step reuse the cached choice, exact results."""
    pytest.importorskip("triton")
    from molt_kernels.layers import functional as MF
    from molt_kernels.ops.lowrank_mixture import launch

    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    configs.clear_tuning_cache()
    timed, used = [], []

    def fake_seconds(cfg, **inputs):
        timed.append(cfg)
        return 1.0 if cfg.grad_u.num_warps == 8 and cfg.shrink_fwd.num_warps == 8 else 2.0

    config = launch._config

    def spy(*args, **kw):
        cfg = config(*args, **kw)
        used.append(cfg)
        return cfg

    monkeypatch.setattr(launch, "_step_seconds", fake_seconds)
    monkeypatch.setattr(launch, "_config", spy)
    torch.manual_seed(0)
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(12, 2, dtype=torch.float64)
    indices = torch.stack([torch.randperm(6)[:2] for _ in range(12)])
    U = [torch.randn(6, 8, 4, dtype=torch.float64, requires_grad=True)]
    V = [torch.randn(6, 4, 16, dtype=torch.float64, requires_grad=True)]
    grads = {}
    for backend in ("triton", "triton", "reference"):
        y = MF.lowrank_mixture(x, gates, indices, U, V, None, backend=backend)
        grads.setdefault(backend, []).append(
            [y, *torch.autograd.grad(y.square().sum(), [x, U[0], V[0]])])
    n_candidates = len(configs.tuning_candidates(used[0]))
    assert len(timed) == n_candidates > 1  # one tuning, on the first forward only
    assert len(used) == 4 and all(c == used[0] for c in used)  # 2 x (forward, backward)
    assert used[0].grad_u.num_warps == 8 == used[0].shrink_fwd.num_warps
    for got in grads["triton"]:
        for g, r in zip(got, grads["reference"][0], strict=True):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    configs.clear_tuning_cache()
