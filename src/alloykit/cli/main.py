"""The ``alloykit`` command: a thin layer over the Python API.

User mistakes (AlloyError) print one line and exit 2; anything else is a bug and
keeps its traceback.

Every subcommand is registered one way: its parser sets ``func`` (``set_defaults``),
the function ``main`` calls. The command modules import only argparse-level things at
the top; each command imports the library it runs when it runs, so ``alloykit --help``
starts without torch.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from alloykit import __version__
from alloykit.cli import analyze_command, commands, eval_command, gguf_command, search_command, stats_command
from alloykit.errors import AlloyError
from alloykit.progress import show_logs

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500M', '1.5GiB', '123' -> bytes (decimal units, binary with 'i')."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; use bytes or a unit such as 500MB, 5GB, 2GiB")
    num, unit, binary = float(m[1]), m[2].lower(), bool(m[3])
    power = " kmgt".index(unit) if unit else 0
    value = int(num * ((1024 if binary else 1000) ** power))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size '{text}' must be positive")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin/.pt inputs (loaded with weights_only=True)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alloykit", description="Merge fine-tuned models in weight space, streaming, tensor by tensor.")
    ap.add_argument("--version", action="version", version=f"alloykit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="run a recipe and write the merged model folder")
    m.add_argument("recipe", help="YAML recipe (mergekit's schema)")
    m.add_argument("out", help="output folder (written atomically)")
    m.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    m.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's flag)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (overrides the recipe's out_dtype/dtype)")
    m.add_argument("--seed", "--random-seed", type=int, dest="seed", help="seed of randomized methods (default: recipe's, else 0)")
    m.add_argument("--threads", "-j", "--num-threads", type=int, dest="threads", help="worker threads (default: min(4, cores))")
    m.add_argument("--max-shard-size", "--out-shard-size", type=parse_size, dest="max_shard_size", default="5GB",
                   help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    m.add_argument("--memory-budget", type=parse_size, default="1.5GiB", help="working memory for tensors in flight (default 1.5GiB)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    m.add_argument("--resume", action="store_true", help="continue an interrupted merge from its verified complete shards")
    m.add_argument("--fail-on-nonfinite", action="store_true", help="stop with an error when a tensor holds NaN/Inf (default: warn)")
    m.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    m.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    m.add_argument("--output-lora", type=int, metavar="RANK",
                   help="write a PEFT LoRA adapter of rank RANK (the merged model minus base_model) instead of the model")
    m.add_argument("--output-format", choices=["safetensors", "gguf"], default="safetensors",
                   help="gguf: write the weights as one GGUF file (llama.cpp) of --gguf-type instead of safetensors")
    m.add_argument("--gguf-type", default="f16", help="with --output-format gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default f16)")
    m.add_argument("--lora-skip-others", action="store_true",
                   help="with --output-lora: skip changed embeddings and norms instead of saving them as modules_to_save")
    for flag in ("--lazy-unpickle", "--allow-crimes", "--low-cpu-memory", "--read-to-gpu"):
        m.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # mergekit flags: accepted, no effect here
    _add_model_args(m)
    m.set_defaults(func=commands.cmd_merge)

    p = sub.add_parser("plan", help="dry run: list every tensor job; reads headers only")
    p.add_argument("recipe")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_model_args(p)
    p.set_defaults(func=commands.cmd_plan)

    v = sub.add_parser("validate", help="check the recipe and every input's headers; prints OK or the problem")
    v.add_argument("recipe")
    _add_model_args(v)
    v.set_defaults(func=commands.cmd_validate)

    me = sub.add_parser("methods", help="list merge methods, or one method's parameters")
    me.add_argument("name", nargs="?")
    me.add_argument("--markdown", action="store_true", help="print the full reference of every method as Markdown")
    me.set_defaults(func=commands.cmd_methods)

    x = sub.add_parser("extract-lora", help="approximate a fine-tune's delta from its base as a PEFT LoRA adapter")
    x.add_argument("finetuned")
    x.add_argument("out")
    x.add_argument("--base", required=True, help="the model it was fine-tuned from")
    x.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    x.add_argument("--skip-others", action="store_true", help="skip changed embeddings and norms instead of saving them whole")
    x.add_argument("--device", default="cpu")
    x.add_argument("--per-layer", action="store_true", help="print each layer's relative reconstruction error")
    _add_model_args(x)
    x.set_defaults(func=commands.cmd_extract_lora)

    ml = sub.add_parser("merge-lora", help="merge LoRA adapters of one base into one PEFT adapter")
    ml.add_argument("adapters", nargs="+", help="adapter folders, then the output folder (only the output with --recipe)")
    ml.add_argument("--base", help="the adapters' base model folder")
    ml.add_argument("--method", default="cat",
                    help="cat (exact), lorahub (exact, weighted sum of the factors), svd, knots, or a task-vector method "
                         "(ties, dare_ties, ...) then SVD")
    ml.add_argument("--knots-merge", default="ties", help="with --method knots: the method that merges the aligned blocks (default ties)")
    ml.add_argument("--recipe", help="a merge-lora recipe (as written by 'alloykit lorahub') instead of the adapters and options")
    ml.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1)")
    ml.add_argument("--rank", type=int, help="rank of the merged adapter (all methods but cat)")
    ml.add_argument("--density", type=float, help="per-adapter density for trimming methods")
    ml.add_argument("--seed", type=int, default=0)
    ml.set_defaults(func=commands.cmd_merge_lora)

    i = sub.add_parser("inspect", help="tensors, shapes, dtypes, shards and parameter count of a model")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    _add_model_args(i)
    i.set_defaults(func=commands.cmd_inspect)

    # commands with their own module: each adds its parser(s), with ``func`` set the same way
    for module in (analyze_command, stats_command, search_command, eval_command, gguf_command):
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda msg, *a, **k: print(f"alloykit: warning: {msg}", file=sys.stderr)
    show_logs()  # the library's messages (alloykit.* loggers) as 'alloykit: ...' lines on stderr
    try:
        return args.func(args) or 0
    except AlloyError as err:
        print(f"alloykit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("alloykit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'alloykit plan r.yaml | head'
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
