"""gpu_report compiles for sm_80/sm_90 without a GPU and flags spills and shared memory overuse."""

import importlib
import json
import sys

import pytest

from molt_kernels.tools import gpu_report
from molt_kernels.tools.gpu_report import (
    KernelBuild,
    ReportRow,
    check_limits,
    compile_builds,
    mma_instructions,
    render_table,
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _matmul_kernel(a, b, c, M, N, K, stride_am, stride_bk, stride_cm,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * stride_am + (k + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        y = tl.load(b + (k + rk)[:, None] * stride_bk + rn[None, :],
                    mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _spill_kernel(x, y, n, BLOCK: tl.constexpr):
    # A BLOCK x BLOCK fp32 accumulator live across the loop: 512 values per thread with one warp.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(n):
        v = tl.load(x + i * BLOCK + offs)
        acc = acc * v[None, :] + v[:, None]
    tl.store(y + offs[:, None] * BLOCK + offs[None, :], acc)


MATMUL = KernelBuild(
    name="test_matmul",
    config="BM=128,BN=128,BK=64,w8s3",
    fn=_matmul_kernel,
    signature={"a": "*bf16", "b": "*bf16", "c": "*bf16", "M": "i32", "N": "i32:16", "K": "i32:16",
               "stride_am": "i32:16", "stride_bk": "i32:16", "stride_cm": "i32:16",
               "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
    constexprs={"BM": 128, "BN": 128, "BK": 64},
    num_warps=8,
    num_stages=3,
)

SPILL = KernelBuild(
    name="test_spill",
    config="BLOCK=128,w1s1",
    fn=_spill_kernel,
    signature={"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
    constexprs={"BLOCK": 128},
    num_warps=1,
    num_stages=1,
)


@pytest.fixture(scope="module")
def matmul_rows() -> dict[str, ReportRow]:
    rows = compile_builds([MATMUL], ["sm_80", "sm_90"], jobs=1)
    return {row.arch: row for row in rows}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_matmul_resources(matmul_rows: dict[str, ReportRow], arch: str) -> None:
    row = matmul_rows[arch]
    assert row.error is None
    assert row.registers is not None and row.registers > 0
    # The ":16" stride hints let cp.async pipeline: at least two stages of A and B tiles.
    assert row.shared is not None and row.shared >= 2 * (128 * 64 + 64 * 128) * 2
    assert row.static_shared is not None
    assert row.spill_stores == 0 and row.spill_loads == 0
    assert check_limits(row) == []


def test_wgmma_only_on_sm90(matmul_rows: dict[str, ReportRow]) -> None:
    assert matmul_rows["sm_90"].wgmma is True
    assert matmul_rows["sm_80"].wgmma is False
    assert matmul_rows["sm_90"].mma == "wgmma.bf16"
    assert matmul_rows["sm_80"].mma == "mma.bf16"


def test_mma_instructions_name_kind_and_operand_type() -> None:
    ptx = ("wgmma.fence.sync.aligned;\n"
           "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f1};\n")
    assert mma_instructions(ptx) == "mma.tf32,wgmma.bf16"
    assert mma_instructions("fma.rn.f32 %f1, %f2, %f3, %f1;") == ""


def test_large_half_dot_without_wgmma_on_sm90_is_a_problem() -> None:
    big = dict(arch="sm_90", num_warps=4, dot_rows=64, dot_input="bf16", wgmma=False,
               mma="mma.bf16")
    (problem,) = check_limits(_synthetic(**big))
    assert problem == "no wgmma: bf16 dot tile of 64 rows (4 warps) runs on mma.bf16"
    assert check_limits(_synthetic(**(big | {"dot_input": "tf32"})))
    assert check_limits(_synthetic(**(big | {"wgmma": True, "mma": "wgmma.bf16"}))) == []
    assert check_limits(_synthetic(**(big | {"dot_rows": 32}))) == []
    assert check_limits(_synthetic(**(big | {"arch": "sm_80"}))) == []
    assert check_limits(_synthetic(**(big | {"dot_input": "fp32", "mma": ""}))) == []


def test_spill_is_flagged() -> None:
    row = compile_builds([SPILL], ["sm_90"], jobs=1)[0]
    assert row.error is None
    assert row.spill_stores and row.stack
    problems = check_limits(row)
    assert len(problems) == 1 and problems[0].startswith("spill")
    assert "FAIL: spill" in render_table([row])


def _synthetic(**fields: object) -> ReportRow:
    base = dict(kernel="k", config="c", arch="sm_80", num_warps=4, num_stages=3, registers=64,
                shared=0, static_shared=0, stack=0, local=0, spill_stores=0, spill_loads=0)
    return ReportRow(**(base | fields))


def test_shared_memory_limit() -> None:
    assert check_limits(_synthetic(shared=166912)) == []
    (problem,) = check_limits(_synthetic(shared=166913))
    assert "shared memory" in problem and "166912" in problem
    assert check_limits(_synthetic(arch="sm_90", shared=200_000)) == []
    assert check_limits(_synthetic(arch="sm_90", shared=232449))


def test_local_memory_is_a_spill() -> None:
    (problem,) = check_limits(_synthetic(local=16))
    assert problem == "spill: local=16"


def test_compile_error_is_a_failure() -> None:
    bad = KernelBuild(name="bad", config="BLOCK=3", fn=SPILL.fn, signature=SPILL.signature,
                      constexprs={"BLOCK": 3})
    row = compile_builds([bad], ["sm_80"], jobs=1)[0]
    assert row.error is not None and "power of 2" in row.error
    assert check_limits(row) == [f"compile failed: {row.error}"]


def test_signature_must_name_every_parameter() -> None:
    partial = KernelBuild(name="partial", config="", fn=SPILL.fn,
                          signature={"x": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 64})
    row = compile_builds([partial], ["sm_80"], jobs=1)[0]
    assert row.error is not None and "missing ['y', 'n']" in row.error
    hinted = KernelBuild(name="hinted", config="", fn=SPILL.fn,
                         signature=SPILL.signature | {"x": "*fp32:8"}, constexprs={"BLOCK": 64})
    assert "only integer types take ':16'" in compile_builds([hinted], ["sm_80"], jobs=1)[0].error


def test_main_clean_registry(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(gpu_report, "collect_builds", lambda: [MATMUL])
    out = tmp_path / "rows.json"
    assert gpu_report.main(["--arch", "sm_80,sm_90", "--json", str(out), "--jobs", "2"]) == 0
    table = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + table)
    rows = json.loads(out.read_text())
    assert [(r["arch"], r["problems"]) for r in rows] == [("sm_80", []), ("sm_90", [])]
    assert rows[1]["wgmma"] is True


def test_main_fails_on_spill_and_filter(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(gpu_report, "collect_builds", lambda: [MATMUL, SPILL])
    assert gpu_report.main(["--arch", "sm_90", "--kernel", "spill", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "test_spill" in out and "test_matmul" not in out
    assert gpu_report.main(["--kernel", "no_such_kernel"]) == 1


def test_main_without_triton(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    assert gpu_report.main([]) == 2
    assert "needs triton" in capsys.readouterr().err


@pytest.fixture
def fake_ops(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Point molt_kernels.ops at an empty folder; yield a helper that adds an op to it."""
    import molt_kernels.ops as ops

    monkeypatch.setattr(ops, "__path__", [str(tmp_path)])

    def add(op: str, files: dict[str, str]) -> None:
        (tmp_path / op).mkdir()
        for name, text in files.items():
            (tmp_path / op / name).write_text(text)
        importlib.invalidate_caches()

    yield add
    for name in [m for m in sys.modules if m.startswith("molt_kernels.ops.zz_")]:
        del sys.modules[name]


def test_collect_builds_imports_each_builds_module(fake_ops) -> None:
    fake_ops("zz_b", {"builds.py": "def gpu_report_builds():\n    return ['b1', 'b2']\n"})
    fake_ops("zz_a", {"builds.py": "def gpu_report_builds():\n    return ['a1']\n"})
    fake_ops("zz_torch_only", {"pytorch.py": ""})
    assert gpu_report.collect_builds() == ["a1", "b1", "b2"]


def test_collect_builds_fails_on_broken_module(fake_ops) -> None:
    fake_ops("zz_broken", {"builds.py": "import zz_no_such_module\n"})
    with pytest.raises(ImportError):
        gpu_report.collect_builds()
