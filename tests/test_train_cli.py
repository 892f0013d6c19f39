"""`python -m molt_kernels train` end to end. On MiniLM, one process with four data shards is the
reference; a 2-process torchrun run (DDP), a 2-process ``--distribute-layers`` run and an
interrupted-and-resumed run must reproduce it. A tiny transformers model (random weights, built
here, no download) goes through the same hookpoint code as MODEL."""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molt_kernels.interp.activations import forward_hookpoints
from molt_kernels.interp.data import iter_texts
from molt_kernels.layers.transcoder import TopKTranscoder
from molt_kernels.tools.train import PLOT_FILE, main

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("encoder.layer.2.mlp", "encoder.layer.3.mlp")
# 8 steps of 256 tokens, 4 data shards of 64 tokens each; small MOLTs; everything logged.
ARGS = [
    "minilm", "--layers", "2", "3", "--rank-counts", "32:4,16:8", "--max-tokens", "2048",
    "--batch-tokens", "256", "--data-shards", "4", "--buffer-tokens", "256",
    "--init-tokens", "512", "--texts-per-forward", "2", "--log-every", "2", "--eval-every", "4",
    "--eval-tokens", "128", "--eval-jacobian-tokens", "4", "--revive-every", "3",
    "--dead-window-tokens", "512", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def minilm_available():
    pytest.importorskip("tokenizers", reason="the MiniLM tokenizer needs the tokenizers package")
    from molt_kernels.interp.models.minilm import load_minilm

    try:
        load_minilm()
    except ImportError as e:
        pytest.skip(f"MiniLM weights not installed: {e}")


@pytest.fixture(scope="module")
def reference(minilm_available, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main([*ARGS, "--out", str(out), "--plot"]) == 0
    return out


# Under torchrun: both 2-process modes in one process group (one start-up of torch and MiniLM).
TWO_MODES = """
import sys
import torch.distributed as dist
from molt_kernels.interp.trainer import setup_distributed
from molt_kernels.tools.train import main

*args, out = sys.argv[1:]
setup_distributed("cpu")
main([*args, "--out", out + "/data_parallel"])
main([*args, "--distribute-layers", "--out", out + "/distribute_layers"])
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_processes(minilm_available, tmp_path_factory):
    """Output directories of the 2-process runs: data parallel and --distribute-layers."""
    out = tmp_path_factory.mktemp("two_processes")
    (out / "two_modes.py").write_text(TWO_MODES)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(out / "two_modes.py"), *ARGS, str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out / "data_parallel", out / "distribute_layers"


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {
        f"{path}/{name}": t
        for path in PATHS
        for name, t in load_file(out / "layers" / path / "model.safetensors").items()
    }


def max_relative_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa)


def records(out: Path, path: str) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / f"{path}.jsonl").read_text().splitlines()]


def metrics(out: Path, path: str) -> list[tuple]:
    """Every logged value but the timing and the writing rank."""
    skip = {"tokens_per_s", "cpu_s", "rank"}
    return [tuple((k, v) for k, v in r.items() if k not in skip) for r in records(out, path)]


def test_reference_run_logs_and_plot(reference):
    for path in PATHS:
        logged = records(reference, path)
        train = [r for r in logged if "loss" in r]
        evals = [r for r in logged if "eval_fvu" in r]
        assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["step"] for r in evals] == [4, 8]
        assert all(r["tokens_per_s"] > 0 and r["cpu_s"] > 0 for r in train)
        assert all(0 <= r["dead_fraction"] <= 1 for r in train)
        assert train[0]["l0_rank_32"] + train[0]["l0_rank_16"] == pytest.approx(train[0]["l0"])
        assert all(-1 <= r["eval_jacobian_cosine"] <= 1 for r in evals)
    png = (reference / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_two_processes_data_parallel_equal_one_process(reference, two_processes):
    out = two_processes[0]
    assert max_relative_difference(reference, out) <= 1e-5
    for path in PATHS:
        ours, theirs = records(out, path), records(reference, path)
        assert all(r["rank"] == 0 for r in ours)  # rank 0 writes the data-parallel logs
        assert [r.get("loss") for r in ours] == pytest.approx(
            [r.get("loss") for r in theirs], rel=1e-5
        )


def test_distribute_layers_puts_each_layer_on_one_rank(reference, two_processes):
    out = two_processes[1]
    for owner, path in enumerate(PATHS):
        assert {r["rank"] for r in records(out, path)} == {owner}
    assert max_relative_difference(reference, out) <= 1e-5


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(reference, tmp_path):
    first = [*ARGS, "--out", str(tmp_path), "--checkpoint-every", "2"]
    assert main([*first, "--stop-after-steps", "3"]) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]  # every 2 steps, and at the stop
    assert not (tmp_path / "layers").exists()
    assert main([*first, "--resume", str(tmp_path)]) == 0
    ours, theirs = weights(tmp_path), weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for path in PATHS:
        assert metrics(tmp_path, path) == metrics(reference, path)


def tiny_llama(out: Path) -> None:
    """A 2-block Llama with random weights and a word-level tokenizer over the pydoc texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = collections.Counter(
        w for t in list(iter_texts())[:200] for w in re.findall(r"\w+|[^\w\s]", t)
    )
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2}
    vocab.update({w: i + 3 for i, (w, _) in enumerate(words.most_common(500))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>"
    ).save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(out)


def test_tiny_transformers_model_through_the_same_hookpoints(tmp_path):
    pytest.importorskip("transformers")
    from molt_kernels.interp.models.hf import find_mlp_paths, hf_prepare, load_hf_model

    tiny_llama(tmp_path / "model")
    model, tokenizer = load_hf_model(str(tmp_path / "model"))
    assert find_mlp_paths(model) == ["layers.0.mlp", "layers.1.mlp"]
    texts = ["the for statement", "a class", "x"]
    prepare = hf_prepare(tokenizer)
    inputs, keep = prepare(texts)
    n_words = sum(len(t.split()) for t in texts)
    assert keep.sum() == n_words  # BOS and padding dropped
    assert int(hf_prepare(tokenizer, drop_special_tokens=False)(texts)[1].sum()) == n_words + 3
    x, y = forward_hookpoints(model, ["layers.1.mlp"], prepare, texts)["layers.1.mlp"]
    assert x.shape == (n_words, 32)
    # Not bitwise: the hook saw the padded [batch, seq] rows, the check runs on the kept rows,
    # and MKL's sgemm may sum in another order for another row count (seen on an AMD EPYC).
    torch.testing.assert_close(y, model.layers[1].mlp(x), rtol=1e-5, atol=1e-6)

    out = tmp_path / "run"
    argv = [
        str(tmp_path / "model"), "--layers", "0", "1", "--kind", "transcoder", "--k", "4",
        "--n-features", "64", "--max-tokens", "1024", "--batch-tokens", "256",
        "--buffer-tokens", "512", "--init-tokens", "256", "--eval-tokens", "64",
        "--eval-jacobian-tokens", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    for path in ("layers.0.mlp", "layers.1.mlp"):
        layer = TopKTranscoder.from_pretrained(out / "layers" / path)
        assert (layer.cfg.d_in, layer.cfg.n_features, layer.cfg.k) == (32, 64, 4)
        assert {"eval_fvu", "eval_jacobian_cosine"} <= set(records(out, path)[-1])
