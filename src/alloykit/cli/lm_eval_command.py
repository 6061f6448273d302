"""``alloykit eval MODEL --lm-eval TASKS``: lm-evaluation-harness tasks on a model folder, offline.

The options join ``alloykit eval`` (``cli/eval_command.py``), which runs this when ``--lm-eval``
is given; ``--batch-size``, ``--threads`` and ``--json`` are that command's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alloykit.errors import AlloyError


def add_lm_eval_args(e: argparse.ArgumentParser) -> None:
    g = e.add_argument_group("lm-evaluation-harness (--lm-eval)")
    g.add_argument("--lm-eval", nargs="+", dest="lm_eval", metavar="TASK",
                   help="harness task, group or tag names (built-in, or defined in --include-path); MODEL may also be "
                        "a .gguf file or a folder holding one")
    g.add_argument("--include-path", nargs="+", metavar="DIR", help="folders of local harness task YAML files")
    g.add_argument("--limit", type=float, help="examples per harness task (a fraction below 1), for quick checks")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own setting)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    g.add_argument("--seed", type=int, default=0, help="the harness's random seeds (few-shot sampling)")
    g.add_argument("--output", help="write the harness results as JSON to this file")


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from alloykit.eval.lm_harness import format_results, run_lm_eval

    if args.tasks or args.data:
        raise AlloyError("--lm-eval runs harness tasks; give --task/--data (alloykit's tasks) in a separate 'alloykit eval'")
    if args.limit is not None and args.limit <= 0:
        raise AlloyError(f"--limit {args.limit}: must be positive (a count, or a fraction below 1)")
    if args.output and not Path(args.output).absolute().parent.is_dir():
        raise AlloyError(f"--output {args.output}: its folder does not exist")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    res = run_lm_eval(args.model, args.lm_eval, include_path=args.include_path, limit=limit, batch_size=args.batch_size,
                      num_fewshot=args.num_fewshot, device=args.device, dtype=args.dtype, seed=args.seed)
    print(json.dumps(res, indent=1) if args.json else format_results(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
    return 0
