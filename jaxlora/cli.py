"""The `jaxlora` command line. Every command turns a known bad input into one line on stderr
and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxlora.errors import JaxloraError


def _convert(args: argparse.Namespace) -> int:
    from jaxlora.fsutil import check_new_dir, staged_dir
    from jaxlora.models import convert, load_pretrained

    out = Path(args.out_dir)
    check_new_dir(out, overwrite=args.overwrite)
    model = load_pretrained(args.source, dtype=args.dtype)
    source = Path(args.source) if Path(args.source).is_dir() else None
    with staged_dir(out, overwrite=args.overwrite) as tmp:
        convert.save_orbax(tmp, source, model.config, model.params, model.tokenizer)
    print(f"wrote {model.num_params:,} parameters ({args.dtype}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint to jaxlora's Orbax format"
    )
    p.add_argument("source", help="HF model directory, hub id or built-in preset")
    p.add_argument("out_dir", help="output directory (Orbax params + config + tokenizer)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the converted weights (default: float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.set_defaults(func=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxloraError as e:
        print(f"jaxlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
