"""``python -m molt_kernels convert``: other libraries' MOLTs and transcoders to this package's
format (``cfg.json`` + ``model.safetensors``), and back.

    convert --from openmoss SRC_DIR DST_DIR
    convert --from crosslayer-transcoder SRC.ckpt DST_DIR --layer N
    convert --from sparsify SRC_DIR DST_DIR
    convert --to openmoss SRC_DIR DST_DIR --hook-point-in H --hook-point-out H
    convert --to sparsify SRC_DIR DST_DIR

A source that is not what the command says it is, or that the target format cannot hold, gets a
one-line error and exit status 1, and nothing is written. DST must not exist or be empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..interop import (
    load_crosslayer_transcoder,
    load_openmoss,
    load_sparsify,
    save_openmoss,
    save_sparsify,
)
from ..layers.molt import MOLT
from ..layers.transcoder import TopKTranscoder

SOURCES = ("openmoss", "crosslayer-transcoder", "sparsify")
TARGETS = ("openmoss", "sparsify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m molt_kernels convert",
        description="Convert MOLTs and transcoders between other libraries' formats and ours.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="source", choices=SOURCES, help="read SRC in this format, write DST in ours"
    )
    direction.add_argument(
        "--to", dest="target", choices=TARGETS, help="read SRC in our format, write DST in this one"
    )
    parser.add_argument("src", type=Path, help="checkpoint file or directory to read")
    parser.add_argument("dst", type=Path, help="directory to write (must not exist or be empty)")
    parser.add_argument(
        "--layer", type=int, help="crosslayer-transcoder: the layer whose standardiser row to use"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="crosslayer-transcoder: torch.load with weights_only=False "
        "(runs the file's pickled code; only for files you trust)",
    )
    parser.add_argument("--hook-point-in", help="openmoss: the input hook point to record")
    parser.add_argument("--hook-point-out", help="openmoss: the output hook point to record")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.source == "crosslayer-transcoder") != (args.layer is not None):
        parser.error("--layer is required with --from crosslayer-transcoder, and only there")
    hooks = (args.hook_point_in, args.hook_point_out)
    if (args.target == "openmoss") != all(h is not None for h in hooks) or (
        args.target != "openmoss" and any(h is not None for h in hooks)
    ):
        parser.error("--hook-point-in and --hook-point-out go with --to openmoss, both of them")


def convert(args: argparse.Namespace) -> str:
    """Read ``args.src``, then write ``args.dst``; returns what was written, for the log line."""
    if args.dst.exists() and (not args.dst.is_dir() or any(args.dst.iterdir())):
        raise ValueError(f"{args.dst} exists and is not an empty directory")
    # Everything is read and checked before anything is written.
    if args.source == "openmoss":
        layer = load_openmoss(args.src)
    elif args.source == "crosslayer-transcoder":
        layer = load_crosslayer_transcoder(args.src, args.layer, weights_only=not args.trust_pickle)
    elif args.source == "sparsify":
        layer = load_sparsify(args.src)
    elif args.target == "openmoss":
        layer = MOLT.from_pretrained(args.src)
        save_openmoss(
            layer, args.dst, hook_point_in=args.hook_point_in, hook_point_out=args.hook_point_out
        )
        return f"OpenMOSS MOLT ({layer.extra_repr()})"
    else:
        layer = TopKTranscoder.from_pretrained(args.src)
        save_sparsify(layer, args.dst)
        return f"sparsify transcoder ({layer.extra_repr()})"
    layer.save_pretrained(args.dst)
    return f"{type(layer).__name__} ({layer.extra_repr()})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        written = convert(args)
    except (ValueError, TypeError, OSError) as e:  # OSError covers FileNotFoundError
        print(f"convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
