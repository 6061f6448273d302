"""``alloykit analyze A B C --base BASE``: task-vector interference, streamed tensor by tensor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alloykit.cli.lmc_command import add_lmc_arguments, cmd_lmc
from alloykit.errors import AlloyError


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="interference of task vectors: cosine, sign conflicts, what TIES would trim")
    a.add_argument("models", nargs="*", help="fine-tuned models of one base (folders or .safetensors files)")
    a.add_argument("--base", help="the base model they were fine-tuned from (required without --lmc)")
    a.add_argument("--out", help="folder for report.json and the PNG plots (default: print the summary only)")
    a.add_argument("--density", type=float, default=0.2, help="TIES density for the trim statistics (default 0.2)")
    a.add_argument("--names", nargs="+",
                   help="labels of the models in the report, table and plots (default: each path's shortest distinguishing "
                        "suffix, e.g. cola/encoder)")
    a.add_argument("--no-plots", action="store_true", help="write report.json only (no matplotlib needed)")
    a.add_argument("--json", action="store_true", help="print the whole report as JSON on stdout")
    a.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin/.pt inputs (weights_only=True)")
    add_lmc_arguments(a)  # --lmc A B: linear mode connectivity (alloykit.cli.lmc_command)
    a.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.lmc:
        return cmd_lmc(args)
    if not args.models or not args.base:
        raise AlloyError("analyze: give the fine-tuned models and --base (or --lmc A B --data FILE)")
    from alloykit.analysis import analyze

    if args.out and not args.no_plots:  # an optional dependency missing: say so before reading any model
        from alloykit.analysis.plots import require_matplotlib

        require_matplotlib()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\ralloykit: analyze: {done}/{total} tensors", end="" if done < total else "\n", file=sys.stderr)

    report = analyze(args.models, args.base, density=args.density, names=args.names, allow_pickle=args.allow_pickle,
                     progress=progress)
    files = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        files.append(out / "report.json")
        if not args.no_plots:
            from alloykit.analysis.plots import plot_report

            files += plot_report(report, out)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(summary(report))
    for f in files:
        print(f"wrote {f}")
    return 0


def summary(report: dict) -> str:
    names, m = report["models"], report["model"]
    w = max(8, *(len(n) for n in names))
    lines = [f"{report['tensors']} tensors, {m['params']:,} parameters; task-vector cosine similarity:",
             " " * (w + 2) + " ".join(f"{n[:w]:>{w}}" for n in names)]
    for n, row in zip(names, m["cosine"]):
        lines.append(f"  {n:<{w}}" + " ".join(f"{x:>{w}.3f}" for x in row))
    lines.append(f"sign conflict (any two disagree): {100 * m['sign_conflict_rate']:.1f}% of parameters")
    lines.append(f"TIES at density {report['density']}: trims {100 * m['ties_trimmed_fraction']:.1f}% of entries "
                 f"({', '.join(f'{100 * e:.0f}%' for e in m['ties_trimmed_energy'])} of each squared norm); "
                 f"the sign election drops {100 * m['ties_elected_out_fraction']:.1f}% of the kept entries")
    lines.append("per layer: " + ", ".join(f"{l['layer']}: conflict {100 * l['sign_conflict_rate']:.0f}%" for l in report["layers"]))
    return "\n".join(lines)
