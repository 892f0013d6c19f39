"""The on-the-fly trainer: shuffling buffer, text shards, hookpoints, schedules and training options
on a toy model; data parallel and distributed-layer runs under torchrun and a resumed run, each
against one reference run on MiniLM; a tiny transformers model through the same hookpoint code."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from molt_kernels.interp.activations import (
    Hookpoints,
    ShufflingBuffer,
    TextStream,
    forward_hookpoints,
)
from molt_kernels.interp.data import iter_file_texts, iter_texts
from molt_kernels.interp.models.hf import find_mlp_paths
from molt_kernels.interp.objective import batch_topk
from molt_kernels.interp.schedules import annealed_k, linear_warmup, lr_factor
from molt_kernels.interp.trainer import Trainer, TrainerConfig
from molt_kernels.layers.molt import MOLT, MOLTConfig
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig

ROOT = Path(__file__).resolve().parents[1]


# -- the shuffling buffer ---------------------------------------------------------------------


def counting_source(start: int):
    """Chunks of rows [id, 2 id, 3 id] with ids counting up from ``start``; a chunk's length
    (0..40) depends only on its first id, so a source restarted at a chunk boundary continues
    exactly. ``source.next`` is the next id (the data position)."""

    def source():
        n = (source.next * 7 + 3) % 41
        ids = torch.arange(source.next, source.next + n, dtype=torch.float64)
        source.next += n
        return torch.stack([ids, 2 * ids, 3 * ids], dim=1)

    source.next = start
    return source


def test_buffer_holds_at_most_capacity_plus_one_chunk_and_hands_out_every_row_once():
    source = counting_source(0)
    buffer = ShufflingBuffer(64, 3, source, seed=0, dtype=torch.float64)
    storage = buffer.rows.data_ptr()
    taken = []
    for _ in range(60):
        taken.append(buffer.take(16))
        assert buffer.rows.data_ptr() == storage and buffer.rows.shape == (64, 3)
        assert buffer.size <= 64 and len(buffer.pending) <= 40  # the memory bound
    rows = torch.cat(taken)
    ids = rows[:, 0]
    assert torch.equal(rows[:, 1], 2 * ids) and torch.equal(rows[:, 2], 3 * ids)  # rows intact
    assert len(set(ids.tolist())) == len(ids) == 960  # no row twice
    held = torch.cat([buffer.rows[: buffer.size, 0], buffer.pending[:, 0]])
    assert sorted(ids.tolist() + held.tolist()) == list(range(source.next))  # no row lost
    assert not torch.equal(ids, ids.sort().values)  # shuffled
    # Rows leave roughly in arrival order on average (no row starves in the pool).
    assert (torch.arange(960.0) - ids).abs().mean() < 64


def test_buffer_state_restores_the_same_batches():
    source = counting_source(0)
    buffer = ShufflingBuffer(50, 3, source, seed=3, dtype=torch.float64)
    for _ in range(5):
        buffer.take(7)
    state, position = buffer.state_dict(), source.next
    expected = [buffer.take(7) for _ in range(10)]
    restored = ShufflingBuffer(50, 3, counting_source(position), seed=99, dtype=torch.float64)
    restored.load_state_dict(state)
    assert all(torch.equal(batch, restored.take(7)) for batch in expected)
    with pytest.raises(ValueError, match="n must be in"):
        buffer.take(51)


# -- texts, hookpoints ------------------------------------------------------------------------


def test_text_stream_shards_partition_the_training_texts_and_hold_out_a_fixed_set():
    stream = TextStream(lambda epoch: [f"text {i}" for i in range(30)], heldout_every=4)
    held = set(stream.heldout())
    assert 0 < len(held) < 30
    per_epoch = 30 - len(held)

    def first(shard, n_shards, n, start=0):
        it = stream.shard(shard, n_shards, start)
        return [next(it) for _ in range(n)]

    both = first(0, 2, per_epoch) + first(1, 2, per_epoch)
    numbers = sorted(n for n, _ in both)
    assert numbers == list(range(2 * per_epoch))  # two epochs, split between the two shards
    assert all(t not in held for _, t in both)
    assert {t for _, t in both} == {f"text {i}" for i in range(30)} - held
    assert first(1, 2, 3, start=7) == [p for p in first(1, 2, 6) if p[0] >= 7][:3]  # skip ahead
    with pytest.raises(ValueError, match="heldout_every"):
        TextStream(lambda epoch: [], heldout_every=1)
    with pytest.raises(ValueError, match="no training text"):
        next(TextStream(lambda epoch: []).shard(0, 1))


def test_file_texts_stream_txt_paragraphs_and_jsonl_documents(tmp_path):
    txt = tmp_path / "corpus.txt"
    paragraphs = [f"paragraph {i} " + "word " * (i % 7) for i in range(3000)]
    txt.write_text("\n\n".join(paragraphs) + "\n")
    chunks = list(iter_file_texts(txt, 120))
    assert all(0 < len(c) <= 120 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(" ".join(paragraphs).split())
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    assert list(iter_file_texts(jsonl)) == ["first doc", "second doc"]  # never packed together
    jsonl.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="docs.jsonl:1"):
        list(iter_file_texts(jsonl))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h):
        return h + self.mlp(h)


class ToyLM(nn.Module):
    """Characters -> embedding -> residual MLP blocks at ``blocks.<i>.mlp``."""

    def __init__(self, d: int = 8, n_blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))

    def forward(self, ids, mask):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return h * mask[..., None]


def toy_prepare(texts):
    """Character codes right-padded with 0; the keep mask drops padding."""
    t = max(1, max(len(s) for s in texts))
    ids = torch.tensor([[ord(c) % 128 for c in s] + [0] * (t - len(s)) for s in texts])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in texts])
    return {"ids": ids, "mask": mask}, mask.bool()


def test_hookpoints_record_every_path_and_skip_the_blocks_after_the_last():
    torch.manual_seed(0)
    model = ToyLM().requires_grad_(False)
    assert find_mlp_paths(model) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    calls = []
    model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    texts = ["ab", "hello", ""]
    pairs = forward_hookpoints(model, ["blocks.1.mlp", "blocks.0.mlp"], toy_prepare, texts)
    assert not calls  # block 2 never ran
    x0, y0 = pairs["blocks.0.mlp"]
    assert x0.shape == (7, 8)  # 2 + 5 characters, no padding rows
    codes = torch.tensor([ord(c) for s in texts for c in s])
    assert torch.equal(x0, model.embed.weight[codes])
    for path in ("blocks.0.mlp", "blocks.1.mlp"):
        x, y = pairs[path]
        # Not bitwise: the hook saw the padded [batch, seq] rows, the check runs on the kept rows,
        # and MKL's sgemm may sum in another order for another row count (seen on an AMD EPYC).
        torch.testing.assert_close(y, model.get_submodule(path)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        Hookpoints(model, ["blocks.0.mlp", "blocks.0.mlp"])
    with pytest.raises(AttributeError, match="blocks.7"):
        Hookpoints(model, ["blocks.7.mlp"])


# -- schedules and batch top-k ----------------------------------------------------------------


def test_schedules():
    assert [lr_factor(s, 10, 4, "constant") for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(4, 14, 4, "linear", 0.1) == 1.0
    assert lr_factor(9, 14, 4, "linear", 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 14, 4, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 14, 4, "cosine", 0.0) == pytest.approx(0.5)
    assert [annealed_k(s, 32, 8, 4) for s in (0, 1, 2, 4, 100)] == [32, 26, 20, 8, 8]
    assert linear_warmup(3, 0) == 1.0 and linear_warmup(1, 4) == 0.25
    with pytest.raises(ValueError, match="decay"):
        lr_factor(0, 10, 1, "exp")


def test_batch_topk_keeps_the_k_times_n_largest_gates_of_the_batch():
    gates = torch.randn(16, 12).relu().requires_grad_()
    kept = batch_topk(gates, 3)
    nonzero = kept != 0
    assert nonzero.sum() == 48
    assert kept[nonzero].min() >= gates[~nonzero].max()  # the largest of the whole batch
    assert nonzero.sum(1).unique().numel() > 1  # tokens differ in how many they keep
    kept.sum().backward()
    assert torch.equal(gates.grad, nonzero.float())  # gradient only through the kept gates
    assert batch_topk(gates, 12) is gates


# -- training options on the toy model --------------------------------------------------------


def toy_run(tmp_path, make_layer, n_layers=2, **settings):
    torch.manual_seed(0)
    model = ToyLM().requires_grad_(False)
    texts = TextStream(lambda e: iter_texts(60, seed=e), heldout_every=10)
    base = dict(
        max_tokens=12 * 256, batch_tokens=256, buffer_tokens=1024, init_tokens=512,
        log_every=1, eval_every=None, eval_tokens=128, eval_jacobian_tokens=4,
        revive_every=None, progress=False,
    )  # fmt: skip
    cfg = TrainerConfig(**{**base, **settings})
    paths = find_mlp_paths(model)[:n_layers]
    layers = Trainer(model, paths, make_layer, toy_prepare, texts, cfg, tmp_path).run()
    logs = {p: read_log(tmp_path / "logs" / f"{p}.jsonl") for p in paths}
    return layers, logs


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def small_molt(k=None):
    return lambda i, d_in, d_out: MOLT(MOLTConfig(d_in, {4: 4, 2: 8}, k, d_out=d_out, init_l0=4))


def test_k_annealing_lr_schedule_and_logs(tmp_path):
    _, logs = toy_run(
        tmp_path, small_molt(k=2), k_start=8, k_anneal_steps=6, lr_warmup_steps=3,
        lr_decay="linear", lr_min_ratio=0.2,
    )  # fmt: skip
    for records in logs.values():
        train = [r for r in records if "loss" in r]
        assert [r["k"] for r in train] == [annealed_k(s, 8, 2, 6) for s in range(12)]
        assert all(r["l0"] <= r["k"] for r in train)
        warmup = 12 // 5  # the sparsity coefficient's default warm-up: a fifth of the steps
        assert [r["sparsity_coef"] for r in train] == pytest.approx(
            [3e-3 * linear_warmup(s + 1, warmup) for s in range(12)]
        )
        assert [r["lr"] for r in train] == pytest.approx(
            [1e-3 * lr_factor(s, 12, 3, "linear", 0.2) for s in range(12)]
        )
        final = records[-1]  # held-out evaluation at the end
        assert {"eval_fvu", "eval_l0", "eval_jacobian_cosine"} <= set(final)
        assert -1 <= final["eval_jacobian_cosine"] <= 1
        assert train[0]["l0_rank_4"] + train[0]["l0_rank_2"] == pytest.approx(train[0]["l0"])


def test_transcoder_with_batch_topk(tmp_path):
    def make(i, d_in, d_out):
        return TopKTranscoder(TranscoderConfig(d_in, 32, 3, d_out=d_out))

    _, logs = toy_run(tmp_path, make, n_layers=1, batch_topk=True, lr=1e-2, lr_warmup_steps=0)
    train = [r for r in next(iter(logs.values())) if "loss" in r]
    assert all(r["l0"] == pytest.approx(3.0) for r in train)  # k x tokens gates per batch
    assert train[-1]["fvu"] < train[0]["fvu"]


def test_encode_takes_a_k_for_the_call():
    molt = MOLT(MOLTConfig(8, {4: 4, 2: 8}, 3, standardize=True, scale_gate_by_norm=True))
    transcoder = TopKTranscoder(TranscoderConfig(8, 32, 3))
    x = torch.randn(5, 8)
    for layer in (molt, transcoder):
        assert all(torch.equal(a, b) for a, b in zip(layer.encode(x, k=3), layer.encode(x)))
        gates, indices = layer.encode(x, k=6)
        assert gates.shape == indices.shape == (5, 6)
        assert torch.equal(gates[:, :3], layer.encode(x)[0])  # the top 3 of the top 6


def test_layers_with_options_train(tmp_path):
    def make(i, d_in, d_out):
        cfg = MOLTConfig(d_in, {4: 4, 2: 8}, 2, d_out=d_out, standardize=True,
                         scale_gate_by_norm=True, decoder_bias=False)  # fmt: skip
        return MOLT(cfg)

    _, logs = toy_run(tmp_path, make, n_layers=1, k_start=6, k_anneal_steps=4, batch_topk=True)
    train = [r for r in next(iter(logs.values())) if "loss" in r]
    assert [r["k"] for r in train[:3]] == [6, 5, 4] and train[-1]["k"] == 2
    assert all(r["l0"] <= r["k"] for r in train)


def test_dead_gates_are_tracked_and_reopened(tmp_path):
    def closed(i, d_in, d_out):
        layer = small_molt()(i, d_in, d_out)
        layer.b_gate.data.fill_(-1e3)  # every gate shut: no gradient can open them
        return layer

    settings = dict(init_from_data=False, dead_window_tokens=512, sparsity_coef=0.0)
    _, shut = toy_run(tmp_path / "a", closed, n_layers=1, **settings)
    _, revived = toy_run(tmp_path / "b", closed, n_layers=1, revive_every=4, **settings)
    shut, revived = ([r for r in next(iter(x.values())) if "loss" in r] for x in (shut, revived))
    assert all(r["dead_fraction"] == 1.0 and r["l0"] == 0 for r in shut)
    assert revived[2]["dead_fraction"] == 1.0  # dead until the first reopening at step 4
    assert revived[-1]["dead_fraction"] < 0.5 and revived[-1]["l0"] > 0


def test_gradient_clipping_is_applied(tmp_path):
    def weights(name, **settings):
        layers, _ = toy_run(tmp_path / name, small_molt(), n_layers=1, **settings)
        return next(iter(layers.values())).W_gate.detach()

    start, free = weights("start", lr=0.0), weights("free")
    clipped = weights("clipped", grad_clip=1e-12)
    # Adam undoes a gradient's scale, except through its eps (1e-8): clipped to a norm of 1e-12,
    # the steps shrink ~1e4-fold.
    assert (clipped - start).norm() < 1e-3 * (free - start).norm()


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_tokens"):
        TrainerConfig(max_tokens=10, batch_tokens=64)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainerConfig(lr_decay="step")
    model = ToyLM()
    texts = TextStream(lambda e: iter_texts(60, seed=e))
    with pytest.raises(ValueError, match="bf16"):
        Trainer(model, ["blocks.0.mlp"], small_molt(), toy_prepare, texts,
                TrainerConfig(bf16=True), tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of data_shards"):
        Trainer(model, ["blocks.0.mlp"], small_molt(), toy_prepare, texts,
                TrainerConfig(batch_tokens=100, data_shards=3), tmp_path)  # fmt: skip
