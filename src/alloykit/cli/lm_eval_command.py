"""``alloykit eval MODEL --lm-eval TASKS``: lm-evaluation-harness tasks on a model folder, offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alloykit.errors import AlloyError


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model folder (or .gguf) with lm-evaluation-harness tasks, offline")
    e.add_argument("model", help="a model folder (e.g. a merge's output), a .gguf file, or a folder holding one")
    e.add_argument("--lm-eval", nargs="+", dest="lm_eval", metavar="TASK", required=True,
                   help="harness task or group names (built-in, or defined in --include-path)")
    e.add_argument("--include-path", nargs="+", metavar="DIR", help="folders of local harness task YAML files")
    e.add_argument("--limit", type=float, help="examples per task (a fraction below 1), for quick checks")
    e.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own setting)")
    e.add_argument("--batch-size", type=int, default=8, help="harness batch size (default 8)")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    e.add_argument("--seed", type=int, default=0, help="the harness's random seeds (few-shot sampling)")
    e.add_argument("--output", help="write the results as JSON to this file")
    e.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from alloykit.eval.lm_harness import format_results, run_lm_eval

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.limit is not None and args.limit <= 0:
        raise AlloyError(f"--limit {args.limit}: must be positive (a count, or a fraction below 1)")
    if args.output and not Path(args.output).absolute().parent.is_dir():
        raise AlloyError(f"--output {args.output}: its folder does not exist")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    res = run_lm_eval(args.model, args.lm_eval, include_path=args.include_path, limit=limit, batch_size=args.batch_size,
                      num_fewshot=args.num_fewshot, device=args.device, dtype=args.dtype, seed=args.seed)
    print(format_results(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
    return 0
