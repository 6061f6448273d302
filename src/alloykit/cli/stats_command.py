"""``alloykit stats collect MODEL --out STATS``: statistics for data-dependent merging (fisher, regmean)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    s = sub.add_parser("stats", help="statistics of a model on calibration data, for fisher and regmean merging")
    ssub = s.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    c = ssub.add_parser("collect", help="run a model over calibration data; write Fisher and/or Gram statistics")
    c.add_argument("model", help="a causal LM folder (with --data), or a benchmark fine-tune / encoder folder (with --task)")
    c.add_argument("--out", required=True, help="statistics folder to write (name it under the model's 'stats:' in a recipe)")
    c.add_argument("--task", nargs="+", dest="tasks", help="benchmark task(s): their training split and heads")
    c.add_argument("--data", help="calibration text: FILE.txt (one text per line) or FILE.jsonl (a \"text\" per line)")
    c.add_argument("--kind", default="fisher", choices=["fisher", "fisher_sampled", "gram", "all"],
                   help="fisher: empirical (true labels); fisher_sampled: labels drawn from the model; "
                        "gram: X^T X of every linear layer's inputs; all: fisher and gram (default fisher)")
    c.add_argument("--samples", type=int, default=256, help="calibration examples (per task) (default 256)")
    c.add_argument("--batch-size", type=int, default=16, help="batch size of the Gram passes (Fisher runs one example at a time)")
    c.add_argument("--max-len", type=int, help="tokens per example (default 32 for --task, 512 for --data)")
    c.add_argument("--head", help="the task heads file (default: heads.safetensors in or beside MODEL)")
    c.add_argument("--seed", type=int, default=0, help="seed of fisher_sampled's label draws and of the task splits")
    _add_threads(c)
    c.set_defaults(func=cmd_stats_collect)

    m = ssub.add_parser("collect-merged", help="RegMean++ statistics: merge block by block, Grams of the merged layers' outputs")
    m.add_argument("models", nargs="+", help="the models to merge (causal LM folders, or benchmark fine-tune folders)")
    m.add_argument("--out", nargs="+", required=True, help="one statistics folder per model")
    m.add_argument("--task", nargs="+", dest="tasks", help="benchmark task per model (or one for all)")
    m.add_argument("--data", nargs="+", help="calibration FILE.txt|FILE.jsonl per model (or one for all)")
    m.add_argument("--alpha", type=float, default=0.9, help="RegMean's off-diagonal scale for the block merges (default 0.9); "
                   "merge with the same alpha")
    m.add_argument("--samples", type=int, default=256, help="calibration examples per model (default 256)")
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--max-len", type=int, help="tokens per example (default 32 for --task, 512 for --data)")
    m.add_argument("--head", nargs="+", dest="heads", help="task heads file per model (default: beside each model)")
    m.add_argument("--seed", type=int, default=0, help="seed of the task splits")
    _add_threads(m)
    m.set_defaults(func=cmd_stats_collect_merged)

    e = ssub.add_parser("evaluate", help="a causal LM's loss and perplexity on text, or an encoder's accuracy on a task's test split")
    e.add_argument("model")
    e.add_argument("--task", nargs="+", dest="tasks", help="benchmark task(s): accuracy on the test split with their heads")
    e.add_argument("--data", help="held-out text: FILE.txt (one text per line) or FILE.jsonl (a \"text\" per line)")
    e.add_argument("--samples", type=int, default=1000, help="examples (per task) (default 1000)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-len", type=int, help="tokens per example (default 32 for --task, 512 for --data)")
    e.add_argument("--head", help="the task heads file (default: heads.safetensors in or beside MODEL)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_threads(e)
    e.set_defaults(func=cmd_stats_evaluate)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine, 2 threads "
                   "ran the per-example Fisher 25 times slower)")


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))


def cmd_stats_collect(args: argparse.Namespace) -> int:
    _threads(args)
    from alloykit.errors import AlloyError
    from alloykit.stats.collect import collect_to_folder

    if args.samples <= 0 or args.batch_size <= 0:
        raise AlloyError("--samples and --batch-size must be positive")
    collect_to_folder(args.model, args.out, tasks=args.tasks, data=args.data, kind=args.kind, samples=args.samples,
                      batch_size=args.batch_size, max_len=args.max_len, head=args.head, seed=args.seed)
    return 0


def cmd_stats_collect_merged(args: argparse.Namespace) -> int:
    _threads(args)
    from alloykit.errors import AlloyError
    from alloykit.stats.sequential import collect_merged_to_folders

    if args.samples <= 0 or args.batch_size <= 0 or not 0 <= args.alpha <= 1:
        raise AlloyError("--samples and --batch-size must be positive, --alpha in [0, 1]")
    collect_merged_to_folders(args.models, args.out, tasks=args.tasks, data=args.data, alpha=args.alpha,
                              samples=args.samples, batch_size=args.batch_size, max_len=args.max_len, heads=args.heads,
                              seed=args.seed)
    return 0


def cmd_stats_evaluate(args: argparse.Namespace) -> int:
    _threads(args)
    import json

    from alloykit.stats.collect import evaluate

    r = evaluate(args.model, tasks=args.tasks, data=args.data, samples=args.samples, batch_size=args.batch_size,
                 max_len=args.max_len, head=args.head)
    if args.json:
        print(json.dumps(r, indent=1))
    elif "perplexity" in r:
        print(f"{r['model']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} over {r['positions']} tokens "
              f"of {r['examples']} texts ({r['data']})")
    else:
        print(f"{r['model']}: accuracy {100 * r['accuracy']:.1f}% on {r['examples']} examples ({r['data']})")
    return 0
