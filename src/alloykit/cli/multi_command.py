"""``alloykit multi``: multi-stage recipes, as ``mergekit-multi`` runs them; and the path
``alloykit merge FILE OUT`` takes when FILE holds several documents."""

from __future__ import annotations

import argparse
import tempfile
from argparse import Namespace
from pathlib import Path

from alloykit.errors import RecipeError


def add_parser(sub, parse_size, parse_count, no_ops: dict[str, str]) -> None:
    """``parse_size``/``parse_count`` (the merge command's parsers of --max-shard-size and
    --out-shard-size) and ``no_ops`` (mergekit flags accepted without effect, with the reason)
    come from ``alloykit.cli.main``, passed in to keep imports one-way."""
    p = sub.add_parser(
        "multi",
        help="run a multi-stage recipe (mergekit-multi's format): named merges feed later ones",
        description="Documents separated by '---', each a recipe; a document with a 'name' is written to "
        "INTERMEDIATE_DIR/NAME and later documents may use it as a model; the unnamed one (at most one) is the final "
        "merge, written to --out-path. Finished stages are skipped on a rerun, interrupted ones resumed, changed ones redone.",
    )
    p.add_argument("recipe", help="multi-document YAML recipe")
    p.add_argument("--intermediate-dir", "-I", required=True, help="folder of the named (intermediate) merges")
    p.add_argument("--out-path", "--out", dest="out", help="output folder of the unnamed (final) merge")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="skip merges whose output is up to date, resume interrupted ones (default: --lazy)")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda")
    p.add_argument("--seed", "--random-seed", type=int, dest="seed", help="seed of randomized methods, for every merge")
    p.add_argument("--threads", "-j", "--num-threads", type=int, dest="threads", help="worker threads")
    p.add_argument("--max-shard-size", type=parse_size, dest="max_shard_size", default=None,
                   help="largest output shard in bytes, with units: 5GB, 500MB (default 5GB)")
    p.add_argument("--out-shard-size", type=parse_count, dest="out_shard_size", metavar="N",
                   help="mergekit's flag: a count with K/M/B (as 'alloykit merge' reads it)")
    p.add_argument("--overwrite", action="store_true", help="let the final merge replace an existing output folder")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    p.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin inputs (loaded with weights_only=True)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    for flag, why in no_ops.items():
        dest = "copy_tokenizer" if flag == "--copy-tokenizer" else None
        p.add_argument(flag, action="store_true", help=f"accepted for mergekit compatibility, no effect: {why}",
                       **({"dest": dest, "default": True} if dest else {}))
    p.set_defaults(func=cmd_multi)


def _options(args: Namespace) -> dict:
    import torch

    from alloykit.merge import DEFAULT_SHARD_SIZE

    device = "cuda" if getattr(args, "cuda", False) else args.device
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise RecipeError(f"--device {device}: use cpu, or cuda on a machine with a CUDA device")
    if getattr(args, "out_shard_size", None) is not None and args.max_shard_size is not None:
        raise RecipeError("give one of --max-shard-size (bytes, e.g. 5GB) or --out-shard-size (mergekit's, e.g. 5B)")
    shard = args.max_shard_size or getattr(args, "out_shard_size", None) or DEFAULT_SHARD_SIZE
    opts = dict(device=device, threads=args.threads, seed=args.seed, max_shard_size=shard,
                allow_pickle=args.allow_pickle, progress=not args.quiet, copy_tokenizer=args.copy_tokenizer)
    for extra in ("fail_on_nonfinite",):
        if hasattr(args, extra):
            opts[extra] = getattr(args, extra)
    if hasattr(args, "memory_budget"):
        opts["budget_bytes"] = args.memory_budget
    return opts


def _summary(report) -> str:
    return "; ".join(f"{stage.label}: {what} -> {stage.out}" for stage, what in report)


def cmd_multi(args: Namespace) -> int:
    from alloykit.multi import run_multi

    report = run_multi(args.recipe, args.intermediate_dir, args.out, lazy=args.lazy, overwrite=args.overwrite,
                       **_options(args))
    if not args.quiet:
        print(_summary(report))
    return 0


def merge_documents(args: Namespace, documents: list[dict]) -> int:
    """``alloykit merge FILE OUT`` with several documents: the final merge goes to OUT, the named
    ones to --intermediate-dir (default: OUT-intermediates beside OUT)."""
    from alloykit.multi import load_stages, run_stages

    if args.output_lora is not None:
        raise RecipeError("--output-lora works on one recipe; this file holds several documents (a multi-stage recipe)")
    if getattr(args, "ray", None) is not None:
        raise RecipeError("--ray works on one recipe; this file holds several documents (a multi-stage recipe): "
                          "run it without --ray, or merge each document with --ray")
    if args.resume:
        raise RecipeError("--resume: a multi-stage recipe resumes interrupted merges by itself; rerun without --resume")
    out = Path(args.out)
    inter = Path(args.intermediate_dir) if args.intermediate_dir else out.parent / f"{out.name}-intermediates"
    stages = load_stages(documents, inter, out, sink_to_out=True)
    if args.dtype:
        final = next(s for s in stages if s.out == out.absolute())
        final.recipe = final.recipe.model_copy(update={"out_dtype": args.dtype})
    report = run_stages(stages, inter, overwrite=args.overwrite, recipe_dir=Path(args.recipe).parent, **_options(args))
    if not args.quiet:
        print(_summary(report))
    return 0


def validate_documents(args: Namespace, documents: list[dict]) -> int:
    """``alloykit validate`` of a multi-stage recipe: every document's schema and the graph; the
    headers of each merge whose inputs exist now (the others read merges not made yet)."""
    from alloykit.multi import load_stages
    from alloykit.request import MergeRequest

    with tempfile.TemporaryDirectory() as tmp:  # where intermediates would go: only to build the graph
        stages = load_stages(documents, tmp, Path(tmp) / "final", sink_to_out=True)
        checked = []
        for stage in stages:
            if stage.uses:
                checked.append(f"{stage.label} (after {', '.join(stage.uses)})")
                continue
            MergeRequest(stage.recipe, Path(args.recipe).parent, allow_pickle=args.allow_pickle).plan().close()
            checked.append(stage.label)
    print(f"OK: {len(stages)} merges in this order: {' -> '.join(checked)}; "
          "inputs checked for the merges that read no other merge")
    return 0
