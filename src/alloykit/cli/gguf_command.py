"""``alloykit convert SRC OUT``: a GGUF file to a Hugging Face folder, or a folder (or GGUF) to a GGUF file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from alloykit.errors import OutputError


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="GGUF -> Hugging Face safetensors folder, or a model -> one GGUF file (OUT ending in .gguf)")
    c.add_argument("source", help="a .gguf file (or a folder with one), or a Hugging Face model folder")
    c.add_argument("out", help="OUT.gguf: write one GGUF file; anything else: a Hugging Face folder (safetensors)")
    c.add_argument("--type", dest="gguf_type", default="f16",
                   help="GGUF tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default f16)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="safetensors output: the weights' dtype (default: as read)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.add_argument("--quiet", "-q", action="store_true")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    out = Path(args.out)
    if out.suffix.lower() == ".gguf":
        from alloykit.io.gguf_write import check_type, write_gguf

        qtype = check_type(args.gguf_type)
        if out.exists() and not args.overwrite:
            raise OutputError(f"output file '{out}' exists; choose another name or pass --overwrite")
        if not out.parent.is_dir():
            raise OutputError(f"folder '{out.parent}' does not exist; create it first")
        write_gguf(Path(args.source), out, qtype)
    else:
        from alloykit.merge import merge

        recipe = {"merge_method": "passthrough", "models": [{"model": str(args.source)}]}
        if args.dtype:
            recipe["dtype"] = args.dtype
        merge(recipe, out, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"converted {args.source} in {time.monotonic() - t0:.1f}s -> {out}")
    return 0
