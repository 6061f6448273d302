"""Write docs/benchmarks.md and its plots from docs/benchmarks.json (made by run.py and scaling.py).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path("docs")
#: issue 17's targets: the mergekit family at most 2.5x the read-sum-write baseline, at least
#: 2x faster than mergekit (these three 8x), at most 1 GB of anonymous memory
FAMILY = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
          "model_stock", "slerp", "nuslerp", "multislerp", "karcher")
TARGET_8X = ("ties", "breadcrumbs", "della")
MEMORY_BOUND = 1e9


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def table(size: str, r: dict) -> list[str]:
    rsw = r["read-sum-write"]
    base, base_cpu = rsw["wall_median"], rsw["cpu_median"]
    cache = "page cache dropped before every run" if "cold" in size else "page cache warm"
    lines = [
        f"### {size}: Llama-shaped, bf16, base + 3 fine-tunes ({r.get('hardware', '')}, {cache})",
        "",
        f"Baselines: read-sum-write {base:.1f} s wall, {base_cpu:.1f} CPU s (runs {rsw['runs']}, "
        f"{rsw['wall_min']:.1f}-{rsw['wall_max']:.1f} s, anon {fmt_gb(rsw['rss_anon_peak'])} GB); "
        f"copy {r['copy']['wall_median']:.1f} s.",
        "",
        "| method | alloykit wall s (runs) | CPU s | anon GB | x baseline (wall) | x baseline (CPU) "
        "| mergekit wall s | mergekit CPU s | mergekit anon GB | mergekit / alloykit (wall) | (CPU) | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, a in r.get("alloykit", {}).items():
        m = r.get("mergekit", {}).get(method)
        ratio, cpu_ratio = a["wall_median"] / base, a["cpu_median"] / base_cpu
        speedup = m["wall_median"] / a["wall_median"] if m else None
        cpu_speedup = m["cpu_median"] / a["cpu_median"] if m else None
        mem_ok = a["rss_anon_peak"] <= MEMORY_BOUND
        if method in FAMILY:
            need = 8 if method in TARGET_8X else 2
            target = f"<= 2.5x, >= {need}x mergekit, <= 1 GB"
            ok = ("yes" if ratio <= 2.5 and (speedup or 0) >= need and mem_ok else
                  "no" if m or ratio > 2.5 or not mem_ok else "mergekit not measured")
            if ok == "yes" and (cpu_ratio > 2.5 or (cpu_speedup or 0) < need):
                ok = "in wall time; not in CPU s"
            elif ok == "no" and cpu_ratio <= 2.5 and mem_ok and not m:
                ok = "not in wall time; in CPU s (mergekit not measured)"
        else:
            target, ok = "-", "-"
        lines.append(
            f"| {method} | {a['wall_median']:.1f} ({a['runs']}) | {a['cpu_median']:.1f} | {fmt_gb(a['rss_anon_peak'])} | "
            f"{ratio:.2f}x | {cpu_ratio:.2f}x | "
            + (f"{m['wall_median']:.1f} | {m['cpu_median']:.1f} | {fmt_gb(m['rss_anon_peak'])} | {speedup:.1f}x | {cpu_speedup:.1f}x | "
               if m else "- | - | - | - | - | ")
            + f"{target} | {ok} |"
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
