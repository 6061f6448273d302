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
from alloykit.cli import (align_command, analyze_command, clean_command, commands, eval_command, gguf_command, lora_command,
                          moe_command, multi_command, search_command, stats_command, tokensurgeon_command)
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


_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmb]?)\s*$", re.IGNORECASE)


def parse_count(text: str) -> int:
    """mergekit's size syntax: '5B', '500M', '20K', '123' (K/M/B = thousand/million/billion)."""
    m = _COUNT_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count; use a number with K, M or B (thousand, million, "
                                         "billion), e.g. 5B, or --max-shard-size with byte units (5GB)")
    value = int(float(m[1]) * 1000 ** " kmb".index(m[2].lower() or " "))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


#: mergekit-yaml flags accepted for compatibility that change nothing here, with the reason
MERGEKIT_NO_OPS = {
    "--lazy-unpickle": "tensors are always read lazily, one at a time",
    "--allow-crimes": "models of different architectures are refused either way (by their tensors' names and shapes)",
    "--low-cpu-memory": "memory is bounded by --memory-budget, not by whole models",
    "--read-to-gpu": "with --device cuda each tensor is read and moved to the GPU as it is merged",
    "--copy-tokenizer": "the tokenizer is copied by default (--no-copy-tokenizer turns it off)",
    "--write-model-card": "a model card (README.md) is always written, with the recipe and inputs",
}


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
    m.add_argument("--max-shard-size", type=parse_size, dest="max_shard_size", default=None,
                   help="largest output shard in bytes, with units: 5GB, 500MB, 2GiB (default 5GB)")
    m.add_argument("--out-shard-size", type=parse_count, dest="out_shard_size", metavar="N",
                   help="mergekit's flag: a count with K/M/B = thousand/million/billion (B is billion, not bytes). "
                        "mergekit's help calls it parameters but its writer caps each shard at N bytes "
                        "(measured with mergekit 0.1.5), so this caps at N bytes too: the same shards as mergekit")
    m.add_argument("--memory-budget", type=parse_size, default="1.5GiB", help="working memory for tensors in flight (default 1.5GiB)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    m.add_argument("--resume", action="store_true", help="continue an interrupted merge from its verified complete shards")
    m.add_argument("--fail-on-nonfinite", action="store_true", help="stop with an error when a tensor holds NaN/Inf (default: warn)")
    m.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    m.add_argument("--verbose", "-v", action="count", default=0, help="log what the merge decides (-vv: debug detail)")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="refused: alloykit never runs code that comes with a checkpoint")
    m.add_argument("--output-lora", type=int, metavar="RANK",
                   help="write a PEFT LoRA adapter of rank RANK (the merged model minus base_model) instead of the model")
    m.add_argument("--output-format", choices=["safetensors", "gguf"], default="safetensors",
                   help="gguf: write the weights as one GGUF file (llama.cpp) of --gguf-type instead of safetensors")
    m.add_argument("--gguf-type", default="f16", help="with --output-format gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default f16)")
    m.add_argument("--lora-skip-others", action="store_true",
                   help="with --output-lora: skip changed embeddings and norms instead of saving them as modules_to_save")
    m.add_argument("--intermediate-dir", "-I", metavar="DIR",
                   help="a multi-stage recipe (several '---' documents): folder of its named merges (default OUT-intermediates)")
    m.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="compute the shards on a Ray cluster: no ADDRESS starts a local one, 'auto' joins this machine's, "
                        "else the head's HOST:PORT (inputs and output on storage every node sees; docs/distributed.md)")
    m.add_argument("--ray-cpus", type=int, metavar="N", help="with --ray and no ADDRESS: CPUs of the local cluster (default: all)")
    for flag, why in MERGEKIT_NO_OPS.items():
        dest = "copy_tokenizer" if flag == "--copy-tokenizer" else None
        m.add_argument(flag, action="store_true", help=f"accepted for mergekit compatibility, no effect: {why}",
                       **({"dest": dest, "default": True} if dest else {}))
    _add_model_args(m)
    m.set_defaults(func=commands.cmd_merge)

    p = sub.add_parser("plan", help="dry run: the jobs grouped by method and parameters, with layer ranges and bytes; reads headers only")
    p.add_argument("recipe")
    p.add_argument("--seed", type=int)
    p.add_argument("--all", action="store_true", help="one line per tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output (every tensor)")
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

    i = sub.add_parser("inspect", help="tensors, shapes, dtypes, shards and parameter count of a model")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    _add_model_args(i)
    i.set_defaults(func=commands.cmd_inspect)

    # commands with their own module: each adds its parser(s), with ``func`` set the same way
    for module in (lora_command, clean_command, analyze_command, stats_command, search_command, eval_command,
                   tokensurgeon_command, align_command, moe_command, gguf_command):
        module.add_parser(sub)
    multi_command.add_parser(sub, parse_size, parse_count, MERGEKIT_NO_OPS)  # merge's size options and no-ops
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "extra_paths", False) and not any(e.startswith("-") for e in extra):
        args.paths += extra  # 'tokensurgeon MODEL --donor DONOR OUT': positionals on both sides of an option
    elif extra:
        parser.parse_args(argv)  # argparse's own message for the unrecognized arguments (exits 2)
    warnings.showwarning = lambda msg, *a, **k: print(f"alloykit: warning: {msg}", file=sys.stderr)
    show_logs()  # the library's messages (alloykit.* loggers) as 'alloykit: ...' lines on stderr
    try:
        return args.func(args) or 0
    except AlloyError as err:
        print(f"alloykit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during a merge: says what was kept and where
        print(f"alloykit: {err}" if str(err) else "alloykit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'alloykit plan r.yaml | head'
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
