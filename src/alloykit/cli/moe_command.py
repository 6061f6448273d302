"""``alloykit moe CONFIG OUT``: build a mixture of experts from a mergekit-moe configuration."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("moe", help="build a Mixtral / Qwen MoE model from dense experts (mergekit-moe's config)",
                       description="Attention, embeddings and norms come from base_model; each layer's MLP becomes one "
                                   "expert per listed model, routed by gate_mode (hidden: the base's hidden states of "
                                   "each expert's prompts; cheap_embed: their token embeddings; random). See docs/moe.md.")
    p.add_argument("config", help="YAML configuration (mergekit-moe's schema)")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="where gate_mode hidden runs the base model: cpu or cuda (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's flag)")
    p.add_argument("--seed", "--random-seed", type=int, dest="seed",
                   help="seed of random gates and noise_scale (default: the config's seed, else 0)")
    p.add_argument("--threads", "-j", type=int, help="worker threads (default: min(4, cores))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy the base's tokenizer")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="allow every expert to be the same model (sparse upcycling, to be trained afterwards)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    for flag in ("--copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "--load-in-4bit", "--load-in-8bit", "--low-cpu-memory"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # mergekit-moe flags: accepted, no effect here
    p.set_defaults(func=cmd_moe)


def cmd_moe(args: argparse.Namespace) -> int:
    import time

    from alloykit.moe.build import build_moe

    t0 = time.monotonic()
    out = build_moe(args.config, args.out, device="cuda" if args.cuda else args.device, seed=args.seed,
                    threads=args.threads, overwrite=args.overwrite, copy_tokenizer=args.copy_tokenizer,
                    allow_all_same=args.allow_all_same, progress=not args.quiet)
    if not args.quiet:
        print(f"built the mixture in {time.monotonic() - t0:.1f}s -> {out}")
    return 0
