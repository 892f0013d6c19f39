"""`python -m molt_kernels train MODEL --layers 2 3 --kind molt|transcoder ... --out DIR`.

Trains one MOLT (or TopK transcoder) per hooked MLP of MODEL on activations made on the fly
(``molt_kernels.interp.trainer``). MODEL is ``minilm`` (all-MiniLM-L6-v2, offline, the default) or
a transformers model name / local directory (needs ``transformers``). Text: CPython's pydoc topics
(offline, reshuffled every epoch) or ``--text FILE`` (.txt or .jsonl with a "text" field).

Data parallel on several processes (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 -m molt_kernels train minilm --layers 2 3 --out runs/a

``--batch-tokens`` is the global batch. ``--data-shards S`` fixes the data split, so runs with any
process count that divides S see the same tokens (``--data-shards 2`` in one process reproduces a
2-process run up to float reordering). ``--distribute-layers`` places layer i on rank i % P.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch

from molt_kernels.interp.activations import TextStream
from molt_kernels.interp.schedules import LR_DECAYS
from molt_kernels.interp.train import PENALTY_FORMS
from molt_kernels.interp.trainer import Trainer, TrainerConfig, setup_distributed
from molt_kernels.layers.config import MOLTConfig
from molt_kernels.layers.flops import matched_transcoder
from molt_kernels.layers.molt import MOLT
from molt_kernels.layers.transcoder import TopKTranscoder, TranscoderConfig

PLOT_FILE = "curves.png"


def _rank_counts(text: str) -> dict[int, int]:
    """'256:1,128:2' -> {256: 1, 128: 2}."""
    try:
        return {int(r): int(c) for r, c in (item.split(":") for item in text.split(","))}
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected RANK:COUNT[,RANK:COUNT...], got {text!r}"
        ) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m molt_kernels train",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainerConfig()
    p.add_argument("model", nargs="?", default="minilm", help="'minilm' or a transformers model")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--layers", type=int, nargs="+", help="block indices of the MLPs to replace")
    where.add_argument("--hookpoints", nargs="+", help="module paths to replace (any model)")
    p.add_argument("--out", required=True, help="output directory (logs, checkpoints, layers)")

    g = p.add_argument_group("layers")
    g.add_argument("--kind", choices=("molt", "transcoder"), default="molt")
    g.add_argument("--n", type=int, default=1, help="MOLT paper allocation N (N x max rank ...)")
    g.add_argument("--rank-counts", type=_rank_counts, help="MOLT ranks, e.g. 64:4,32:8 (over --n)")
    g.add_argument("--k", type=int, help="units kept per token (MOLT default: gating alone)")
    g.add_argument("--activation", choices=("relu", "jumprelu"), default="relu", help="MOLT gate")
    g.add_argument("--init-l0", type=float, default=8.0, help="MOLT transforms open at init")
    g.add_argument("--n-features", type=int, help="transcoder features (default: MOLT-matched)")
    g.add_argument("--skip", action="store_true", help="transcoder skip connection")
    g.add_argument("--backend", choices=("reference", "torch", "triton"), help="layer backend")

    g = p.add_argument_group("data")
    g.add_argument("--text", help="a .txt or .jsonl file (default: CPython's pydoc topics)")
    g.add_argument("--max-chars", type=int, default=400, help="characters per text chunk")
    g.add_argument("--max-length", type=int, default=256, help="tokens per text (HF models)")
    g.add_argument(
        "--keep-special", action="store_true", help="train on special tokens (BOS/[CLS]/[SEP])"
    )
    g.add_argument("--texts-per-forward", type=int, default=d.texts_per_forward)
    g.add_argument("--buffer-tokens", type=int, default=d.buffer_tokens, help="per data shard")
    g.add_argument("--data-shards", type=int, help="data split (default: one per process)")
    g.add_argument("--heldout-every", type=int, default=d.heldout_every)

    g = p.add_argument_group("training")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens)
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="global batch")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--lr-decay", choices=LR_DECAYS, default=d.lr_decay)
    g.add_argument("--lr-min-ratio", type=float, default=d.lr_min_ratio)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm; 0: off")
    g.add_argument("--sparsity-coef", type=float, default=d.sparsity_coef)
    g.add_argument("--sparsity-form", choices=PENALTY_FORMS, default=d.sparsity_form)
    g.add_argument("--sparsity-c", type=float, default=d.sparsity_c)
    g.add_argument("--sparsity-warmup-steps", type=int, help="default: a fifth of the steps")
    g.add_argument("--k-start", type=int, help="anneal k from this value to --k")
    g.add_argument("--k-anneal-steps", type=int, help="default: a fifth of the steps")
    g.add_argument("--batch-topk", action="store_true", help="keep k x tokens gates per batch")
    g.add_argument("--revive-every", type=int, default=d.revive_every, help="0: never")
    g.add_argument("--dead-window-tokens", type=int, default=d.dead_window_tokens)
    g.add_argument("--no-init-from-data", action="store_true")
    g.add_argument("--init-tokens", type=int, default=d.init_tokens)
    g.add_argument("--bf16", action="store_true", help="bf16 compute for the layers (CUDA)")
    g.add_argument("--distribute-layers", action="store_true", help="layer i on rank i %% P")
    g.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if CUDA, else cpu")
    g.add_argument("--seed", type=int, default=d.seed)

    g = p.add_argument_group("logs and checkpoints")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="0: only at the end")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    g.add_argument("--eval-jacobian-tokens", type=int, default=d.eval_jacobian_tokens)
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--resume", help="a run directory or checkpoint to continue from")
    g.add_argument("--stop-after-steps", type=int, help="stop with a checkpoint after N steps")
    g.add_argument("--plot", action="store_true", help=f"draw the curves to OUT/{PLOT_FILE}")
    g.add_argument("--no-progress", action="store_true")
    return p


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    """The TrainerConfig of parsed options (each option is named after its field)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainerConfig) if hasattr(args, f.name)}
    for name in ("grad_clip", "revive_every", "eval_every"):
        values[name] = values[name] or None  # 0 switches the option off
    values.update(init_from_data=not args.no_init_from_data, progress=not args.no_progress)
    return TrainerConfig(**values)


def layer_factory(args: argparse.Namespace):
    """(index, d_in, d_out) -> a fresh layer as the options describe."""

    def molt_config(d_in: int, d_out: int) -> MOLTConfig:
        common = dict(d_out=d_out, activation=args.activation, init_l0=args.init_l0)
        if args.rank_counts:
            return MOLTConfig(d_in=d_in, rank_counts=args.rank_counts, k=args.k, **common)
        return MOLTConfig.paper(d_in, args.n, args.k, **common)

    def make(index: int, d_in: int, d_out: int) -> torch.nn.Module:
        if args.kind == "molt":
            return MOLT(molt_config(d_in, d_out), backend=args.backend)
        if args.k is None:
            raise ValueError("--kind transcoder needs --k")
        if args.n_features:
            cfg = TranscoderConfig(d_in, args.n_features, args.k, d_out=d_out, skip=args.skip)
        else:
            cfg = matched_transcoder(molt_config(d_in, d_out), k=args.k, skip=args.skip)
        return TopKTranscoder(cfg, backend=args.backend)

    return make


def load_model(args: argparse.Namespace, device: torch.device):
    """(model, prepare, MLP paths in block order) for MODEL."""
    from molt_kernels.interp.models.hf import find_mlp_paths

    drop_special = not args.keep_special
    if args.model == "minilm":
        from molt_kernels.interp.capture import minilm_prepare
        from molt_kernels.interp.models.minilm import load_minilm

        model = load_minilm(device=device)
        prepare = minilm_prepare(model, drop_special)
    else:
        from molt_kernels.interp.models.hf import hf_prepare, load_hf_model

        model, tokenizer = load_hf_model(args.model, device=device)
        prepare = hf_prepare(tokenizer, device, args.max_length, drop_special)
    return model, prepare, find_mlp_paths(model) if args.layers else []


def text_stream(args: argparse.Namespace) -> TextStream:
    from molt_kernels.interp.data import iter_file_texts, iter_texts

    if args.text:
        if not Path(args.text).is_file():
            raise FileNotFoundError(f"--text {args.text}: no such file")
        return TextStream(
            lambda epoch: iter_file_texts(args.text, args.max_chars), args.heldout_every
        )
    return TextStream(
        lambda epoch: iter_texts(args.max_chars, seed=args.seed + epoch), args.heldout_every
    )


def plot_logs(out_dir: str | Path) -> Path:
    """Draw every layer's training curves from ``out_dir/logs/*.jsonl`` to
    ``out_dir/curves.png``: FVU (train and held-out), L0, dead fraction, held-out Jacobian
    cosine and tokens/s against tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'molt_kernels[bench]'") from e
    out_dir = Path(out_dir)
    logs = sorted((out_dir / "logs").glob("*.jsonl"))
    if not logs:
        raise FileNotFoundError(f"no logs in {out_dir / 'logs'}")
    panels = [
        ("fvu", "FVU (train)"),
        ("eval_fvu", "FVU (held-out)"),
        ("l0", "L0 (active units / token)"),
        ("dead_fraction", "dead fraction"),
        ("eval_jacobian_cosine", "Jacobian cosine (held-out)"),
        ("tokens_per_s", "tokens / s"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for log in logs:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for ax, (key, title) in zip(axes.flat, panels):
            points = [(r["tokens"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=log.stem, marker="." if len(points) < 30 else None)
            ax.set_title(title)
            ax.set_xlabel("tokens")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes.flat[0].set_yscale("log")
    axes.flat[1].set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = trainer_config(args)
    joined = torch.distributed.is_initialized()  # a caller's process group is left to it
    info = setup_distributed(args.device)
    model, prepare, mlp_paths = load_model(args, info.device)
    if args.layers:
        bad = [i for i in args.layers if not -len(mlp_paths) <= i < len(mlp_paths)]
        if bad:
            raise ValueError(f"--layers {bad}: the model has {len(mlp_paths)} MLP blocks")
        paths = [mlp_paths[i] for i in args.layers]
    else:
        paths = args.hookpoints
    out = Path(args.out)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run = {"argv": list(argv if argv is not None else sys.argv[1:]), "paths": paths}
        run["world_size"] = info.world
        (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    trainer = Trainer(
        model, paths, layer_factory(args), prepare, text_stream(args), cfg, out, info, args.resume
    )
    trainer.run()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every owner has written its logs
        if not joined:
            torch.distributed.destroy_process_group()
    if args.plot and info.rank == 0:
        print(f"curves: {plot_logs(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
