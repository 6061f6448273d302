"""``alloykit analyze --lmc A B --data FILE``: the options, and the command (its own module; analyze hooks it in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alloykit.errors import AlloyError


def add_lmc_arguments(a: argparse.ArgumentParser) -> None:
    g = a.add_argument_group("linear mode connectivity (--lmc A B)")
    g.add_argument("--lmc", nargs=2, metavar=("A", "B"),
                   help="loss and accuracy along the linear path from A to B, as they are and with B aligned to A")
    g.add_argument("--data", help="--lmc: evaluation data: text (.txt/.jsonl) for causal LMs, .jsonl with \"text\" and "
                                  "\"label\" for sequence classifiers")
    g.add_argument("--align", nargs="+", default=["weight_matching"], metavar="METHOD",
                   help="--lmc: alignment methods to compare with the naive path: weight_matching, "
                        "activation_matching, or none (default weight_matching)")
    g.add_argument("--repair", action="store_true", help="--lmc: also REPAIR every point of the aligned paths")
    g.add_argument("--calibration", help="--lmc: calibration texts for activation matching and REPAIR (default --data)")
    g.add_argument("--steps", type=int, default=11, help="--lmc: points on each path, ends included (default 11)")
    g.add_argument("--samples", type=int, default=1000, help="--lmc: evaluation examples read from --data (default 1000)")


def cmd_lmc(args: argparse.Namespace) -> int:
    from alloykit.align.compare import lmc_report, summary

    if args.models or args.base:
        raise AlloyError("--lmc A B compares two models: give no other models and no --base")
    if not args.data:
        raise AlloyError("--lmc needs --data (evaluation texts; labelled .jsonl for classifiers)")
    methods = tuple(m for m in args.align if m != "none")
    unknown = [m for m in methods if m not in ("weight_matching", "activation_matching")]
    if unknown:
        raise AlloyError(f"--align {unknown[0]}: choose weight_matching, activation_matching or none")
    if args.repair and not methods:
        raise AlloyError("--repair rescales aligned paths: give an --align method")
    if args.steps < 2:
        raise AlloyError(f"--steps {args.steps}: the path needs at least 2 points")

    def say(msg: str) -> None:
        if sys.stderr.isatty():
            print(f"alloykit: {msg}", file=sys.stderr, flush=True)

    report = lmc_report(args.lmc[0], args.lmc[1], args.data, methods=methods, with_repair=args.repair,
                        calibration=args.calibration, steps=args.steps, samples=args.samples, say=say)
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
