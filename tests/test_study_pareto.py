"""The Pareto study pipeline end to end on a tiny config, and its matched-parameter helpers."""

import json
import math
from dataclasses import replace

import pytest
import torch

from molt_kernels.layers.config import MOLTConfig
from molt_kernels.tools import study as study_cli
from molt_kernels.tools.studies import pareto

pytest.importorskip("tokenizers", reason="the MiniLM tokenizer needs the tokenizers package")
pytest.importorskip("matplotlib", reason="the study's plots need matplotlib")

TINY = pareto.StudyConfig(
    layers=(2,),
    seeds=(0,),
    sparsity_coefs=(1e-3,),
    molt_ks=(2,),
    transcoder_ks=(4, 8),
    steps=4,
    batch_size=64,
    train_tokens=512,
    eval_tokens=256,
    jacobian_tokens=6,
    embedding_texts=3,
    workers=1,
    uniform_threshold=True,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        from molt_kernels.interp.models import load_minilm

        load_minilm()
    except ImportError as e:
        pytest.skip(f"MiniLM weights not installed: {e}")
    out = tmp_path_factory.mktemp("pareto")
    records = pareto.run_study(TINY, out, progress=False, log=lambda *_: None)
    return out, records


def test_pareto_json_has_one_finite_record_per_point(report):
    out, records = report
    saved = json.loads((out / "pareto.json").read_text())
    assert saved["points"] == records
    assert saved["meta"]["config"]["steps"] == TINY.steps
    assert 0 < saved["meta"]["mean_ablation_embedding_cosine"]["2"] < 1
    assert len(records) == len(TINY.points()) == 6
    assert {(r["kind"], r["gating"]) for r in records} == {
        ("molt", "threshold"),
        ("molt", "topk"),
        ("molt-uniform", "topk"),
        ("molt-uniform", "threshold"),
        ("transcoder", "topk"),
    }
    for r in records:
        assert set(r) == set(pareto.RECORD_FIELDS)
        assert r["layer"] == 2 and r["seed"] == 0
        finite = ("params", "fvu", "nmse", "l0", "dead_fraction", "jacobian_cosine")
        finite += ("embedding_cosine", "flops_forward", "flops_train", "train_seconds")
        for key in finite:
            assert math.isfinite(r[key]), (key, r)
        assert abs(r["params_ratio"] - 1) < pareto.MAX_PARAM_MISMATCH
        assert 0 <= r["dead_fraction"] <= 1 and -1 <= r["jacobian_cosine"] <= 1
        assert -1 <= r["embedding_cosine_all_tokens"] <= 1
        assert r["flops_train"] == 3 * r["flops_forward"]
        assert r["train_tokens"] == 512 and r["eval_tokens"] == 256
        if r["gating"] == "topk":
            assert r["l0"] <= r["k"]


def test_plots_and_table_are_written(report, capsys):
    out, records = report
    assert pareto.main(["--out", str(out), "--render"]) == 0
    printed = capsys.readouterr().out
    assert "FVU @L0=2" in printed
    assert "transcoder (topk)" in printed and "molt (threshold)" in printed
    for name, *_ in pareto.PLOTS:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow  # spawns two workers that each import torch and load MiniLM
def test_worker_processes_give_the_in_process_records(report, tmp_path):
    # Two spawned workers, one thread each, on the threshold and transcoder points only.
    _, records = report
    study = replace(TINY, molt_ks=(2,), transcoder_ks=(4,), workers=2)
    pooled = pareto.run_study(study, tmp_path, progress=False, log=lambda *_: None)
    assert not (tmp_path / ".cache").exists()
    expected = {(r["kind"], r["gating"], r["k"]): r for r in records}
    assert len(pooled) == len(study.points())
    for r in pooled:
        same = expected[(r["kind"], r["gating"], r["k"])]
        assert r["params"] == same["params"]
        assert r["fvu"] == pytest.approx(same["fvu"], rel=1e-3)
        assert r["l0"] == pytest.approx(same["l0"], rel=1e-3)


def test_runs_merge_into_one_report(report, tmp_path):
    out, records = report
    merged = pareto.merge_runs([out], tmp_path)
    assert merged == records
    assert json.loads((tmp_path / "pareto.json").read_text())["points"] == records
    with pytest.raises(ValueError, match="more than one"):
        pareto.merge_runs([out, out], tmp_path)


def test_interpolation_at_equal_l0():
    assert pareto.interpolate_at([1, 4], [0.5, 0.1], 2) == pytest.approx(0.3)
    assert pareto.interpolate_at([4, 1, 16], [0.1, 0.5, 0.0], 8) == pytest.approx(0.05)
    assert pareto.interpolate_at([1, 4], [0.5, 0.1], 8) is None


def test_uniform_allocation_matches_the_paper_parameters():
    for n, d in ((1, 384), (2, 384), (1, 768), (3, 100)):
        paper = MOLTConfig.paper(d, n, None)
        counts = pareto.uniform_rank_counts(paper)
        assert len(counts) == 1
        uniform = MOLTConfig(d_in=d, rank_counts=counts, k=None)
        mismatch = abs(uniform.n_parameters() / paper.n_parameters() - 1)
        assert mismatch < pareto.MAX_PARAM_MISMATCH, (n, d, counts)
    assert pareto.uniform_rank_counts(MOLTConfig.paper(384, 1, None)) == {40: 32}


def test_every_point_layer_is_parameter_matched():
    every_curve = replace(pareto.FULL, uniform_threshold=True)
    for spec in every_curve.points():
        torch.manual_seed(0)
        layer = pareto.build_layer(every_curve, spec)
        params = sum(p.numel() for p in layer.parameters())
        paper = pareto.FULL.paper_config(None).n_parameters()
        assert abs(params / paper - 1) < pareto.MAX_PARAM_MISMATCH, spec
    assert len({s.curve for s in every_curve.points()}) == 5
    assert len({s.curve for s in pareto.FULL.points()}) == 4  # the uniform curve with top-k only
    for curve in {s.curve for s in pareto.QUICK.points()}:
        assert sum(s.curve == curve for s in pareto.QUICK.points()) >= 5


def test_cli_options_and_errors(capsys):
    study, _ = pareto.parse_args(["--out", "x", "--quick", "--layers", "0", "4", "--seeds", "3"])
    assert study.layers == (0, 4) and study.seeds == (3,) and study.steps == pareto.QUICK.steps
    assert not study.uniform_threshold
    study, _ = pareto.parse_args(["--out", "x", "--uniform-threshold"])
    assert study.uniform_threshold and study.steps == pareto.FULL.steps
    with pytest.raises(SystemExit):
        pareto.parse_args(["--out", "x", "--layers", "6"])
    with pytest.raises(ValueError, match="molt_ks"):
        pareto.StudyConfig(molt_ks=())
    assert study_cli.main(["nope"]) == 2
    assert "pareto" in capsys.readouterr().err
