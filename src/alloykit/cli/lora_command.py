"""``alloykit extract-lora`` and ``alloykit merge-lora``: the commands that write PEFT adapters.

extract-lora also accepts mergekit-extract-lora's flags, under their names (``--model``,
``--base-model``, ``--out-path``, ``--max-rank``, ``--embed-lora``, ...); the few that
cannot apply here are accepted and listed as no-ops, and ``--trust-remote-code`` is refused.
"""

from __future__ import annotations

import argparse
from argparse import Namespace

from alloykit.errors import AlloyError, RecipeError

#: mergekit-extract-lora options that change nothing here (accepted so its command lines run)
NO_OP_FLAGS = ("--lazy-unpickle", "--no-lazy-unpickle", "--allow-crimes", "--no-allow-crimes", "--low-cpu-memory",
               "--no-low-cpu-memory", "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "--gpu-rich",
               "--async-write", "--no-async-write", "--copy-tokenizer", "--no-copy-tokenizer", "--clone-tensors",
               "--no-clone-tensors", "--write-model-card", "--no-write-model-card", "--safe-serialization", "--no-cuda",
               "--no-quiet")
NO_OP_VALUE_FLAGS = ("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--write-threads", "--out-shard-size")
DEFAULT_RANK = 128  # mergekit-extract-lora's --max-rank default


def add_parser(sub) -> None:
    x = sub.add_parser(
        "extract-lora", help="approximate a fine-tune's delta from its base as a PEFT LoRA adapter",
        description="Write a PEFT LoRA adapter approximating FINETUNED - BASE by a truncated SVD of each linear layer. "
                    "mergekit-extract-lora's flags work too (names in brackets).",
        epilog="accepted for mergekit-extract-lora command lines, no effect here: " + " ".join(NO_OP_FLAGS + NO_OP_VALUE_FLAGS)
               + ". --trust-remote-code is refused: alloykit never runs code that came with a checkpoint.")
    x.add_argument("finetuned", nargs="?", help="the fine-tuned model [--model]")
    x.add_argument("out", nargs="?", help="the adapter folder to write [--out-path]")
    x.add_argument("--model", dest="model_flag", metavar="FINETUNED", help=argparse.SUPPRESS)
    x.add_argument("--out-path", dest="out_flag", metavar="OUT", help=argparse.SUPPRESS)
    x.add_argument("--base", "--base-model", dest="base", required=True, help="the model it was fine-tuned from [--base-model]")
    x.add_argument("--rank", "--max-rank", dest="rank", type=int,
                   help=f"LoRA rank r, the largest rank of a module [--max-rank] (default {DEFAULT_RANK}, as mergekit)")
    x.add_argument("--skip-others", "--skip-undecomposable", dest="skip_others", action="store_true",
                   help="skip changed embeddings and norms instead of saving them whole [--skip-undecomposable]")
    x.add_argument("--distribute-scale", dest="distribute_scale", action="store_true", default=True,
                   help="B = U S^1/2, A = S^1/2 V^T (default) [--distribute-scale]")
    x.add_argument("--no-distribute-scale", dest="distribute_scale", action="store_false", help="B = U, A = S V^T")
    x.add_argument("--embed-lora", dest="embed_lora", action="store_true", default=False,
                   help="embeddings as LoRA (lora_embedding_A/B) instead of saved whole [--embed-lora]")
    x.add_argument("--no-embed-lora", dest="embed_lora", action="store_false", help=argparse.SUPPRESS)
    x.add_argument("--save-module", action="append", default=[], metavar="NAME",
                   help="save this module whole (full name or last component; repeatable) [--save-module]")
    x.add_argument("-e", "--exclude-regex", action="append", default=[], metavar="REGEX",
                   help="leave out modules matching REGEX (repeatable) [--exclude-regex]")
    x.add_argument("-i", "--include-regex", action="append", default=[], metavar="REGEX",
                   help="only modules matching one REGEX (repeatable) [--include-regex]")
    x.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values <= this, so a module's rank may be lower (default 0) [--sv-epsilon]")
    x.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0, help="seed of the randomized SVD (default 0)")
    x.add_argument("--threads", "-j", "--num-threads", dest="threads", type=int, help="worker threads (default: min(4, cores))")
    x.add_argument("--device", default="cpu", help="compute device: cpu or cuda")
    x.add_argument("--cuda", action="store_true", help="same as --device cuda")
    x.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    x.add_argument("--resume", action="store_true", help="succeed without work when OUT already holds this very adapter")
    x.add_argument("--per-layer", action="store_true", help="print each layer's relative reconstruction error")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    x.add_argument("-v", dest="verbose", action="count", default=0, help=argparse.SUPPRESS)
    x.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    x.add_argument("--no-trust-remote-code", action="store_false", dest="trust_remote_code", help=argparse.SUPPRESS)
    for flag in NO_OP_FLAGS:
        x.add_argument(flag, action="store_true", dest=f"noop_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    for flag in NO_OP_VALUE_FLAGS:
        x.add_argument(flag, dest=f"noop_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    x.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin/.pt inputs (loaded with weights_only=True)")
    x.set_defaults(func=cmd_extract_lora)

    ml = sub.add_parser("merge-lora", help="merge LoRA adapters of one base into one PEFT adapter")
    ml.add_argument("adapters", nargs="+", help="adapter folders, then the output folder (only the output with --recipe)")
    ml.add_argument("--base", help="the adapters' base model folder")
    ml.add_argument("--method", default="cat",
                    help="cat (exact), lorahub (exact, weighted sum of the factors), svd, knots, or a task-vector method "
                         "(ties, dare_ties, sce, ...) then SVD")
    ml.add_argument("--knots-merge", default="ties", help="with --method knots: the method that merges the aligned blocks (default ties)")
    ml.add_argument("--recipe", help="a merge-lora recipe (as written by 'alloykit search lorahub') instead of the adapters and options")
    ml.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1, for methods with a weight)")
    ml.add_argument("--rank", type=int, help="rank of the merged adapter (all methods but cat and lorahub)")
    ml.add_argument("--density", type=float, help="density for trimming methods (the method's 'density' parameter)")
    ml.add_argument("--seed", type=int, default=0)
    ml.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    ml.set_defaults(func=cmd_merge_lora)


def _one(positional: str | None, flag: str | None, what: str, flag_name: str) -> str:
    if positional and flag and positional != flag:
        raise RecipeError(f"extract-lora: {what} given twice ('{positional}' and {flag_name} '{flag}'); give it once")
    value = positional or flag
    if not value:
        raise RecipeError(f"extract-lora: give the {what} ({what.upper().replace(' ', '_')} or {flag_name})")
    return value


def cmd_extract_lora(args: Namespace) -> int:
    from alloykit.cli.commands import check_device
    from alloykit.lora.extract import AdapterOptions, extract
    from alloykit.output.adapter import summary

    if args.trust_remote_code:
        raise AlloyError("--trust-remote-code: refused; alloykit reads tensors and configs only and never runs code "
                         "that came with a checkpoint (drop the flag)")
    finetuned = _one(args.finetuned, args.model_flag, "fine-tuned model", "--model")
    out = _one(args.out, args.out_flag, "output folder", "--out-path")
    device = "cuda" if args.cuda else args.device
    check_device(device)
    options = AdapterOptions(args.rank if args.rank is not None else DEFAULT_RANK, save_others=not args.skip_others,
                             distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
                             sv_epsilon=args.sv_epsilon, save_modules=tuple(args.save_module),
                             include=tuple(args.include_regex), exclude=tuple(args.exclude_regex), seed=args.seed)
    written = extract(finetuned, args.base, out, options, device=device, allow_pickle=args.allow_pickle,
                      threads=args.threads, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume)
    if written.already_done:
        print(f"nothing to do: '{written.path}' already holds this adapter (same inputs and options)")
        return 0
    if args.per_layer:
        for r in written.reports:
            print(f"{r.name} {list(r.shape)} {r.kind} {r.rel_error:.5f}")
    print(summary(written.reports) + f" -> {out}")
    return 0


def cmd_merge_lora(args: Namespace) -> int:
    from alloykit.lora.merge import run_merge_lora
    from alloykit.lora.recipe import load_merge_lora_recipe, merge_lora_request

    if args.recipe:
        if len(args.adapters) != 1:
            raise RecipeError("merge-lora --recipe FILE: give only the output folder")
        request, recipe_dir = load_merge_lora_recipe(args.recipe)
        out = args.adapters[0]
    else:
        if len(args.adapters) < 2:
            raise RecipeError("merge-lora: give the adapter folders and then the output folder")
        if not args.base:
            raise RecipeError("merge-lora: give --base, the adapters' base model folder")
        *adapters, out = args.adapters
        request = merge_lora_request({"base": args.base, "adapters": adapters, "method": args.method, "weights": args.weights,
                                      "rank": args.rank, "density": args.density, "seed": args.seed,
                                      "knots_merge": args.knots_merge})
        recipe_dir = None
    written = run_merge_lora(request, out, recipe_dir=recipe_dir, overwrite=args.overwrite)
    errors = written.errors or {}
    worst = max(errors.values(), default=0.0)
    print(f"merged {len(request.adapters)} adapters with {request.method} -> {out}"
          + (f" (truncation error per module: worst {worst:.4f})" if errors else " (exact)"))
    return 0
