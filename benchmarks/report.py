"""Write docs/benchmarks.md and its plots from docs/benchmarks.json (made by run.py and scaling.py).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path("docs")
FAST = ("linear", "task_arithmetic")
TARGET_8X = ("ties", "breadcrumbs", "della")


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def table(size: str, r: dict) -> list[str]:
    base = r["read-sum-write"]["wall_median"]
    lines = [
        f"### {size} Llama-shaped, bf16, base + 3 fine-tunes ({r.get('hardware', '')}, page cache warm)",
        "",
        f"Baselines: read-sum-write {base:.1f} s (runs {r['read-sum-write']['runs']}, "
        f"{r['read-sum-write']['wall_min']:.1f}-{r['read-sum-write']['wall_max']:.1f} s, anon {fmt_gb(r['read-sum-write']['rss_anon_peak'])} GB); "
        f"copy {r['copy']['wall_median']:.1f} s.",
        "",
        "| method | alloykit wall s (median, min-max, runs) | CPU s | anon RSS GB | mergekit wall s (runs) | mergekit anon GB | alloykit / baseline | mergekit / alloykit | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, a in r.get("alloykit", {}).items():
        m = r.get("mergekit", {}).get(method)
        ratio = a["wall_median"] / base
        speedup = m["wall_median"] / a["wall_median"] if m else None
        if method in FAST:
            target, ok = "<= 1.2x baseline, >= 2x mergekit", ratio <= 1.2 and (speedup or 0) >= 2
        elif method in TARGET_8X:
            target, ok = "<= 2.5x baseline, >= 8x mergekit", ratio <= 2.5 and (speedup or 0) >= 8
        else:
            target, ok = "<= 2.5x baseline", ratio <= 2.5
        mem_ok = a["rss_anon_peak"] < 2e9
        lines.append(
            f"| {method} | {a['wall_median']:.1f} ({a['wall_min']:.1f}-{a['wall_max']:.1f}, {a['runs']}) | {a['cpu_median']:.1f} | "
            f"{fmt_gb(a['rss_anon_peak'])}{'' if mem_ok else ' (over 2)'} | "
            + (f"{m['wall_median']:.1f} ({m['runs']}) | {fmt_gb(m['rss_anon_peak'])} | " if m else "- | - | ")
            + f"{ratio:.2f}x | " + (f"{speedup:.1f}x" if speedup else "-") + f" | {target} | {'yes' if ok else 'no'} |"
        )
    return lines


def plots(results: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots skipped: pip install matplotlib)"]
    out = []
    scaling = results.get("scaling", {})
    if scaling.get("size"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in scaling["size"].items():
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("wall time (s)")
        ax.set_title("Merge time against model size (base + 3 fine-tunes)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "bench-size.png", dpi=110)
        out.append("![time against size](bench-size.png)")
    if scaling.get("inputs"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in scaling["inputs"].items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("fine-tuned inputs merged")
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"Merge time against number of inputs ({scaling.get('inputs_size', '')})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "bench-inputs.png", dpi=110)
        out.append("![time against inputs](bench-inputs.png)")
    return out


def main() -> None:
    results = json.loads((DOCS / "benchmarks.json").read_text())
    header = (DOCS / "benchmarks-notes.md").read_text() if (DOCS / "benchmarks-notes.md").exists() else ""
    lines = ["# Benchmarks", "", header.strip(), ""]
    for size, r in results.items():
        if size == "scaling" or "read-sum-write" not in r:
            continue
        lines += table(size, r) + [""]
    lines += ["## Scaling", ""] + plots(results) + [""]
    if results.get("scaling"):
        lines += ["```json", json.dumps(results["scaling"], indent=1), "```", ""]
    subspace = DOCS / "benchmarks-subspace.md"  # written by hand from benchmarks/subspace_cost.py --table
    if subspace.exists():
        lines += [subspace.read_text().strip(), ""]
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
