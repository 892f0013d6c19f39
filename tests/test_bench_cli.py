"""The bench CLI end to end on a tiny config: tables on stdout, well-formed JSON."""

import json
import math

import pytest
import torch

from molt_kernels.layers.flops import molt_reference_cost
from molt_kernels.tools import bench

TINY = ["--d", "64", "--n", "1", "--tokens", "128", "--repeats", "1", "--no-progress"]


def test_tiny_run_writes_tables_and_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert bench.main([*TINY, "--k", "4,40", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| d=64 N=1 k=4 tok=128 | torch " in out
    assert "TC/MOLT fwd" in out
    assert "d=64 N=1 k=40 tok=128: skipped, k=40 > T=31 transforms" in out

    # A saved report renders to the same tables.
    assert bench.main(["--render", str(path)]) == 0
    assert capsys.readouterr().out == out

    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["torch"] == torch.__version__
    assert report["dense_matmul"]["flops_per_s"] > 0
    assert report["command"].startswith("python -m molt_kernels bench --d 64")
    cases = {c["k"]: c for c in report["cases"]}
    assert cases[40]["skipped"] and "transcoder" not in cases[40]
    assert 0 < cases[4]["active_transforms"] <= 4
    assert cases[4]["transcoder"]["d_in"] == 64

    results = report["results"]
    impls = ["reference", "torch", "transcoder"]
    assert [(r["impl"], r["mode"]) for r in results] == [(i, m) for i in impls for m in bench.MODES]
    for r in results:
        assert r["skipped"] is None
        assert r["time_s"] > 0 and len(r["times_s"]) == 1
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        assert math.isclose(
            r["useful_flops_per_s"], r["useful_flops_per_token"] * 128 / r["time_s"]
        )
    ref = results[0]
    assert ref["speedup_vs_reference"] == 1.0
    cfg = bench.BenchCase(64, 1, 4, 128).molt_config()
    assert ref["flops_per_token"] == molt_reference_cost(cfg).forward
    torch_fwd = results[2]
    assert torch_fwd["fraction_of_flop_ratio"] == pytest.approx(
        torch_fwd["speedup_vs_reference"] * torch_fwd["flops_per_token"] / ref["flops_per_token"]
    )


def test_runs_over_the_time_limit_are_skipped_with_a_reason(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = [*TINY, "--k", "4", "--backends", "torch", "--no-transcoder"]
    assert bench.main([*args, "--max-run-seconds", "1e-9", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torch forward: skipped, predicted" in out
    results = json.loads(path.read_text())["results"]
    assert len(results) == 2
    assert all(r["time_s"] is None and "--max-run-seconds" in r["skipped"] for r in results)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "fast"], "choose from reference, torch, triton"),
        (["--d", "0"], "expected positive integers"),
        (["--tokens", "1k"], "expected comma-separated integers"),
        (["--backends", "triton", "--device", "cpu"], "do not run natively on cpu"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--render", "/nonexistent/bench.json"], "--render /nonexistent/bench.json"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot(tmp_path, capsys):
    path = tmp_path / "plot.png"
    args = [*TINY, "--k", "4", "--modes", "forward", "--plot", str(path)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            bench.main(args)
        assert "--plot needs matplotlib" in capsys.readouterr().err
        return
    assert bench.main(args) == 0
    assert path.read_bytes().startswith(b"\x89PNG")


def test_gate_table_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gate.json"
    argv = ["--gate", "--t", "256", "--d", "16", "--k", "8", "--tokens", "32", "--repeats", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 256 | 16 | 8 | 32 | unfused |" in printed and "| torch |" in printed
    rows = json.loads(out.read_text())["gate"]
    assert {r["impl"] for r in rows} == {"unfused", "torch"}
    # With fp32 inputs the only difference is the [tokens, T] logits, moved four times unfused.
    from molt_kernels.tools.bench.gate import bytes_moved

    extra = bytes_moved("unfused", 32, 256, 16, 8, 4) - bytes_moved("triton", 32, 256, 16, 8, 4)
    assert extra == 4 * 32 * 256 * 4


def test_contend_runs_busy_processes_and_stops_them(tmp_path):
    import os

    from molt_kernels.tools.bench.contend import busy_processes

    with busy_processes(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    path = tmp_path / "bench.json"
    tiny = [*TINY, "--k", "4", "--no-transcoder", "--modes", "forward"]
    assert bench.main([*tiny, "--contend", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["contend"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda:" in err and "CUDA" in err


def test_cost_model_applies_to_bf16_triton_on_known_gpus(monkeypatch):
    from molt_kernels.tools.bench.measure import model_gpu, modeled_seconds
    from molt_kernels.tools.bench.workload import BenchCase

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert model_gpu(cuda, torch.bfloat16) == "h100"
    assert model_gpu(cuda, torch.float32) is None  # the model is bf16 only
    assert model_gpu(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    assert model_gpu(cuda, torch.bfloat16) is None
    case = BenchCase(2304, 16, 32, 16384)
    forward, step = (modeled_seconds(case, mode, "h100") for mode in bench.MODES)
    assert 0 < forward < step


def test_measured_rows_print_the_models_prediction(tmp_path, capsys):
    """A CPU report with a fake model prediction (the GPU path fills ``modeled_s``) renders the
    MODELED columns: modeled ms and measured / modeled."""
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--k", "4", "--json", str(path)]) == 0
    assert "MODELED" not in capsys.readouterr().out  # no model on the CPU
    report = json.loads(path.read_text())
    report["cost_model_gpu"] = "h100"
    for result in report["results"]:
        if result["impl"] == "torch":
            result["modeled_s"] = 1e-3
    path.write_text(json.dumps(report))
    assert bench.main(["--render", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MODELED fwd ms (meas/model)" in out and "MODELED f+b ms (meas/model)" in out
    assert "on h100's datasheet numbers" in out
    torch_rows = [line for line in out.splitlines() if "| torch " in line]
    assert len(torch_rows) == 1
    for row in torch_rows:
        *_, fwd, step = (cell.strip() for cell in row.strip(" |").split("|"))
        results = [r for r in report["results"] if r["impl"] == "torch"]
        for cell, result in zip((fwd, step), results, strict=True):
            ratio = "" if result["time_s"] is None else f" ({result['time_s'] / 1e-3:.2f}x)"
            assert cell == "1.00" + ratio
    reference_rows = [line for line in out.splitlines() if "| reference " in line]
    assert reference_rows and not any("x)" in line for line in reference_rows)
