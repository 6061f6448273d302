"""``alloykit align MODEL --to REFERENCE OUT``: permute MODEL's hidden units to match REFERENCE."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    a = sub.add_parser("align", help="permute a model's hidden units to match a reference (Git Re-Basin); same function")
    a.add_argument("model", help="the model folder to permute")
    a.add_argument("out", help="output folder (written atomically)")
    a.add_argument("--to", required=True, dest="reference", help="the reference model folder (same architecture)")
    a.add_argument("--method", default="weight_matching", choices=["weight_matching", "activation_matching"],
                   help="weight_matching (no data) or activation_matching (needs --data); default weight_matching")
    a.add_argument("--data", help="calibration text for activation matching: .txt (a text per line) or .jsonl (\"text\")")
    a.add_argument("--samples", type=int, default=256, help="calibration texts read (default 256)")
    a.add_argument("--max-len", type=int, default=128, help="tokens per calibration text (default 128)")
    a.add_argument("--max-iter", type=int, default=100, help="weight matching: most coordinate-descent sweeps (default 100)")
    a.add_argument("--seed", type=int, default=0, help="weight matching: seed of the order groups are visited in")
    a.add_argument("--permute-outputs", action="store_true",
                   help="a bare encoder (no head): move its output features too (recorded in alloykit_alignment.json)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    a.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin/.pt inputs (weights_only=True)")
    a.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> int:
    from alloykit.align import align

    res = align(args.model, args.reference, args.out, method=args.method, data=args.data, samples=args.samples,
                max_len=args.max_len, max_iter=args.max_iter, seed=args.seed, permute_outputs=args.permute_outputs,
                overwrite=args.overwrite, allow_pickle=args.allow_pickle, progress=not args.quiet)
    print(summary(res.report))
    print(f"wrote {res.path}")
    return 0


def summary(report: dict) -> str:
    groups = report["groups"]
    kinds = {}
    for g in groups:
        kind = "residual stream" if g["name"] == "residual" else g["name"].split(".")[-1]
        kinds.setdefault(kind, []).append(g["moved_fraction"])
    parts = [f"{kind} {len(v)}x, {100 * sum(v) / len(v):.0f}% moved" for kind, v in kinds.items()]
    lines = [f"{report['method']} ({report['family']}): {len(groups)} permutation groups: {'; '.join(parts) or 'none'}"]
    if "objective_before" in report:
        lines.append(f"weight matching: sum <W_ref, P(W_model)> {report['objective_before']:.4g} -> "
                     f"{report['objective_after']:.4g} in {report['iterations']} sweep(s), {report['seconds']}s")
    if "mean_correlation" in report:
        mc = report["mean_correlation"].values()
        if mc:
            before = sum(m["identity"] for m in mc) / len(mc)
            after = sum(m["matched"] for m in mc) / len(mc)
            lines.append(f"activation matching: mean unit correlation {before:.3f} (as is) -> {after:.3f} (matched), "
                         f"{report['seconds']}s")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
