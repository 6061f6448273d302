"""``alloykit analyze --lmc A B --data FILE``: the options, and the command (its own module; analyze hooks it in)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alloykit.errors import AlloyError


def add_lmc_arguments(a: argparse.ArgumentParser) -> None:
    g = a.add_argument_group("linear mode connectivity (--lmc A B)")
    g.add_argument("--lmc", nargs=2, metavar=("A", "B"),
                   help="loss and accuracy along the linear path from A to B, as they are and with B aligned to A")
    g.add_argument("--task", nargs="+", dest="tasks", help="--lmc: built-in task names or task files (TASK.yaml); "
                   "their --split is evaluated, their training split calibrates")
    g.add_argument("--data", help="--lmc: evaluation data instead of tasks: text (.txt/.jsonl) for causal LMs, .jsonl "
                                  "with \"text\" and \"label\" for sequence classifiers")
    g.add_argument("--split", default="test", help="--lmc: the tasks' split to evaluate (default test)")
    g.add_argument("--max-len", type=int, help="--lmc: tokens per text (default: the task's, else 32 for built-in tasks, "
                   "128 for other classification data, 512 for causal LMs)")
    g.add_argument("--align", nargs="+", default=["weight_matching"], metavar="METHOD",
                   help="--lmc: alignment methods to compare with the naive path: weight_matching, "
                        "activation_matching, or none (default weight_matching)")
    g.add_argument("--repair", action="store_true", help="--lmc: also REPAIR every point of the aligned paths")
    g.add_argument("--calibration", help="--lmc: calibration texts for activation matching and REPAIR (default: the "
                   "tasks' training split, or --data's texts)")
    g.add_argument("--steps", type=int, default=11, help="--lmc: points on each path, ends included (default 11)")
    g.add_argument("--samples", type=int, default=1000, help="--lmc: evaluation examples per task (default 1000)")


def cmd_lmc(args: argparse.Namespace) -> int:
    from alloykit.align.compare import lmc_report, summary

    if args.models or args.base:
        raise AlloyError("--lmc A B compares two models: give no other models and no --base")
    if bool(args.tasks) == bool(args.data):
        raise AlloyError("--lmc needs the evaluation data: --task TASK... or --data FILE (labelled .jsonl for classifiers)")
    methods = tuple(m for m in args.align if m != "none")
    unknown = [m for m in methods if m not in ("weight_matching", "activation_matching")]
    if unknown:
        raise AlloyError(f"--align {unknown[0]}: choose weight_matching, activation_matching or none")
    if args.repair and not methods:
        raise AlloyError("--repair rescales aligned paths: give an --align method")
    if args.steps < 2:
        raise AlloyError(f"--steps {args.steps}: the path needs at least 2 points")

    report = lmc_report(args.lmc[0], args.lmc[1], tasks=args.tasks, data=args.data, split=args.split, methods=methods,
                        with_repair=args.repair, calibration=args.calibration, steps=args.steps, samples=args.samples,
                        max_len=args.max_len)
    files = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lmc.json").write_text(json.dumps(report, indent=1) + "\n")
        files.append(out / "lmc.json")
        if not args.no_plots:
            from alloykit.align.plots import plot_paths

            files.append(plot_paths(report["paths"], out / "lmc.png", f"{Path(args.lmc[0]).name} -> {Path(args.lmc[1]).name}"))
    print(json.dumps(report, indent=1) if args.json else "\n".join([summary(report)] + [f"wrote {f}" for f in files]))
    return 0
