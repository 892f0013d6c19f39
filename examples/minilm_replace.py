"""Replace one MLP of all-MiniLM-L6-v2 with a MOLT and with a parameter-matched TopK transcoder.

Offline, on CPU: captures the layer's (mlp_in, mlp_out) pairs over CPython's pydoc topics (train
and held-out texts are disjoint), trains both replacements, splices each into the model and
prints FVU, L0, Jacobian cosine against the MLP, and how much the sentence embeddings move.

    python examples/minilm_replace.py                 # about 5 minutes on 2 CPU cores
    python examples/minilm_replace.py --steps 300     # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch

from molt_kernels import MOLT, MOLTConfig
from molt_kernels.interp.capture import capture_mlp_activations
from molt_kernels.interp.data import iter_texts
from molt_kernels.interp.metrics import (
    fvu,
    jacobian_cosine,
    l0,
    module_jacobian,
    molt_jacobian,
    transcoder_jacobian,
)
from molt_kernels.interp.models import load_minilm, minilm_mlp_path
from molt_kernels.interp.replace import get_module, replaced
from molt_kernels.interp.train import TrainConfig, train
from molt_kernels.layers.flops import matched_transcoder
from molt_kernels.layers.transcoder import TopKTranscoder


def capture(model, path: str, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, ...]:
    pairs = capture_mlp_activations(model, path, texts, max_tokens=max_tokens, progress=False)
    return tuple(torch.cat(t) for t in zip(*pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3, help="MiniLM layer whose MLP is replaced")
    parser.add_argument("--n", type=int, default=1, help="MOLT allocation N (N x 256 ... 16N x 16)")
    parser.add_argument(
        "--l0", type=float, default=8, help="MOLT transforms open per token at init"
    )
    parser.add_argument("--transcoder-k", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-sentences", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--sparsity-coef", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    model = timed("load MiniLM", load_minilm)
    path = minilm_mlp_path(args.layer)
    texts = list(iter_texts())
    split = int(0.9 * len(texts))
    train_texts, eval_texts = texts[:split], texts[split:]
    x, y = timed("capture train", lambda: capture(model, path, train_texts, args.train_tokens))
    xe, ye = timed("capture eval", lambda: capture(model, path, eval_texts, args.eval_tokens))
    print(f"layer {args.layer} MLP: {x.shape[0]} train / {xe.shape[0]} held-out tokens, d=384")

    molt = MOLT(MOLTConfig.paper(384, args.n, None, init_l0=args.l0))
    transcoder = TopKTranscoder(matched_transcoder(molt.cfg, k=args.transcoder_k))
    settings = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        sparsity_coef=args.sparsity_coef,
    )
    for name, layer in (("MOLT", molt), ("transcoder", transcoder)):
        log = timed(
            f"train {name}", lambda layer=layer: train(layer, x, y, TrainConfig(**settings))
        )
        print(f"trained {name}: {log.last()}")

    mlp = get_module(model, path)
    n_jac = min(256, xe.shape[0])
    jac_mlp = timed("MLP Jacobians", lambda: module_jacobian(mlp, xe[:n_jac]))
    sentences = eval_texts[: args.eval_sentences]
    base = model.encode(sentences)
    rows = []
    for name, layer, jac_fn in (
        ("MOLT", molt, molt_jacobian),
        ("transcoder", transcoder, transcoder_jacobian),
    ):
        start = time.perf_counter()
        with torch.no_grad():
            gates, indices = layer.encode(xe)
            pred = layer.decode(xe, gates, indices)
        jac_cos = jacobian_cosine(jac_fn(layer, xe[:n_jac]), jac_mlp).mean().item()
        with replaced(model, {path: layer}):
            spliced = model.encode(sentences)
        emb_cos = torch.nn.functional.cosine_similarity(spliced, base, dim=1).mean().item()
        timings[f"evaluate {name}"] = time.perf_counter() - start
        n_params = sum(p.numel() for p in layer.parameters())
        rows.append((name, n_params, fvu(pred, ye).item(), l0(gates).item(), jac_cos, emb_cos))

    print(
        f"\nheld-out results, MiniLM layer {args.layer} MLP ({xe.shape[0]} tokens, "
        f"Jacobians on {n_jac}, embeddings of {len(sentences)} texts)"
    )
    print(f"{'replacement':<12} {'params':>9} {'FVU':>7} {'L0':>6} {'Jac cos':>8} {'emb cos':>8}")
    for name, n_params, f, active, jc, ec in rows:
        print(f"{name:<12} {n_params:>9} {f:>7.4f} {active:>6.1f} {jc:>8.4f} {ec:>8.4f}")
    print("\nL0 counts transforms for the MOLT and features for the transcoder; 'emb cos' is the")
    print("mean cosine between sentence embeddings before and after splicing the layer in.")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
