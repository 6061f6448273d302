"""``alloykit eval MODEL --task TASK...``: a model's metric on tasks (accuracy, macro F1, perplexity);
``alloykit eval MODEL --lm-eval TASK...``: lm-evaluation-harness tasks (``cli/lm_eval_command.py``).

``alloykit stats evaluate`` is the same command under its first name.
"""

from __future__ import annotations

import argparse
import json

from alloykit.cli.data_args import DATA_HELP, TASK_HELP, add_max_len, add_model_args, add_threads, set_threads
from alloykit.cli.lm_eval_command import add_lm_eval_args, cmd_lm_eval


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="a model's accuracy, macro F1 or perplexity on tasks (task files or built-in tasks), "
                                    "or lm-evaluation-harness tasks (--lm-eval)")
    add_eval_args(e)
    add_lm_eval_args(e)


def add_eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("model", help="a model folder (encoder, sequence-classification model or causal LM)")
    e.add_argument("--task", nargs="+", dest="tasks", help=TASK_HELP)
    e.add_argument("--data", help="held-out data instead of tasks: " + DATA_HELP)
    e.add_argument("--split", default="test", help="the tasks' split: train, validation or test (default test)")
    e.add_argument("--samples", type=int, help="the first N examples of each task (default: all)")
    e.add_argument("--batch-size", type=int, default=32)
    add_max_len(e, causal=512)
    add_model_args(e)
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    add_threads(e)
    e.set_defaults(func=cmd_eval)


def _line(model: str, r: dict, split: bool) -> str:
    lo, hi = r["ci95"]
    where = f"{model} on {r['task']} ({r['split'] + ', ' if split else ''}{r['n']} examples; {r['head']})"
    if r["metric"] == "perplexity":
        return (f"{where}: perplexity {r['perplexity']:.2f} (95% CI {lo:.2f} to {hi:.2f}), loss {r['loss']:.4f} "
                f"over {r['tokens']} tokens")
    if r["metric"] == "macro_f1":
        return f"{where}: macro F1 {r['value']:.4f} (95% CI {lo:.4f} to {hi:.4f}), accuracy {100 * r['accuracy']:.1f}%"
    return f"{where}: accuracy {100 * r['accuracy']:.1f}% (95% CI {100 * lo:.1f} to {100 * hi:.1f})"


def cmd_eval(args: argparse.Namespace) -> int:
    set_threads(args)
    if getattr(args, "lm_eval", None):
        return cmd_lm_eval(args)
    from alloykit.errors import AlloyError
    from alloykit.eval.suite import evaluate_folder

    if (args.samples is not None and args.samples <= 0) or args.batch_size <= 0:
        raise AlloyError("--samples and --batch-size must be positive")
    out = evaluate_folder(args.model, tasks=args.tasks, data=args.data, split=args.split, samples=args.samples,
                          batch_size=args.batch_size, max_len=args.max_len, head=args.head, head_key=args.head_key,
                          model_class=args.model_class, pooling=args.pooling)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for r in out["results"]:
            print(_line(args.model, r, split=not args.data))
    return 0
