"""``alloykit stats collect MODEL --out STATS``: statistics for data-dependent merging (fisher, regmean)."""

from __future__ import annotations

import argparse

from alloykit.cli.data_args import DATA_HELP, TASK_HELP, add_max_len, add_model_args, add_threads, set_threads
from alloykit.cli.eval_command import add_eval_args


def add_parser(sub) -> None:
    s = sub.add_parser("stats", help="statistics of a model on calibration data, for fisher and regmean merging")
    ssub = s.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    c = ssub.add_parser("collect", help="run a model over calibration data; write Fisher and/or Gram statistics",
                        description="Fisher (per example, from the head's log-likelihood of the label, or of the next "
                                    "tokens for a causal LM) and Grams (X^T X of every linear layer's inputs) of MODEL on "
                                    "the training split of each task, or on a --data file.")
    c.add_argument("model", help="a model folder: encoder, sequence-classification model, causal LM, or a quality "
                   "benchmark fine-tune folder (encoder/ + heads.safetensors)")
    c.add_argument("--out", required=True, help="statistics folder to write (name it under the model's 'stats:' in a recipe)")
    c.add_argument("--task", nargs="+", dest="tasks", help=TASK_HELP + "; their training split is read")
    c.add_argument("--data", help="calibration data: " + DATA_HELP)
    c.add_argument("--kind", default="fisher", choices=["fisher", "fisher_sampled", "gram", "all"],
                   help="fisher: empirical (the data's labels, or next tokens); fisher_sampled: labels drawn from the "
                        "model; gram: X^T X of every linear layer's inputs (needs no head, no labels); all: fisher and "
                        "gram (default fisher)")
    c.add_argument("--samples", type=int, default=256, help="calibration examples (per task) (default 256)")
    c.add_argument("--batch-size", type=int, default=16, help="batch size of the Gram passes (Fisher runs one example at a time)")
    add_max_len(c, causal=512)
    add_model_args(c)
    c.add_argument("--seed", type=int, default=0, help="seed of fisher_sampled's label draws")
    add_threads(c)
    c.set_defaults(func=cmd_stats_collect)

    m = ssub.add_parser("collect-merged", help="RegMean++ statistics: merge block by block, Grams of the merged layers' outputs")
    m.add_argument("models", nargs="+", help="the models to merge (any family stats collect reads)")
    m.add_argument("--out", nargs="+", required=True, help="one statistics folder per model")
    m.add_argument("--task", nargs="+", dest="tasks", help="one task per model (or one for all): " + TASK_HELP)
    m.add_argument("--data", nargs="+", help="calibration file per model (or one for all): " + DATA_HELP)
    m.add_argument("--alpha", type=float, default=0.9, help="RegMean's off-diagonal scale for the block merges (default 0.9); "
                   "merge with the same alpha")
    m.add_argument("--samples", type=int, default=256, help="calibration examples per model (default 256)")
    m.add_argument("--batch-size", type=int, default=16)
    add_max_len(m, causal=512)
    add_model_args(m, heads_per_model=True)
    add_threads(m)
    m.set_defaults(func=cmd_stats_collect_merged)

    e = ssub.add_parser("evaluate", help="the same as 'alloykit eval': a model's metric on tasks or held-out text")
    add_eval_args(e)


def cmd_stats_collect(args: argparse.Namespace) -> int:
    set_threads(args)
    from alloykit.errors import AlloyError
    from alloykit.stats.collect import collect_to_folder

    if args.samples <= 0 or args.batch_size <= 0:
        raise AlloyError("--samples and --batch-size must be positive")
    collect_to_folder(args.model, args.out, tasks=args.tasks, data=args.data, kind=args.kind, samples=args.samples,
                      batch_size=args.batch_size, max_len=args.max_len, head=args.head, head_key=args.head_key,
                      model_class=args.model_class, pooling=args.pooling, seed=args.seed)
    return 0


def cmd_stats_collect_merged(args: argparse.Namespace) -> int:
    set_threads(args)
    from alloykit.errors import AlloyError
    from alloykit.stats.sequential import collect_merged_to_folders

    if args.samples <= 0 or args.batch_size <= 0 or not 0 <= args.alpha <= 1:
        raise AlloyError("--samples and --batch-size must be positive, --alpha in [0, 1]")
    collect_merged_to_folders(args.models, args.out, tasks=args.tasks, data=args.data, alpha=args.alpha,
                              samples=args.samples, batch_size=args.batch_size, max_len=args.max_len, heads=args.heads,
                              model_class=args.model_class, pooling=args.pooling)
    return 0
