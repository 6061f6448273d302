"""alloykit's merge time against model size and against the number of inputs.

    python benchmarks/scaling.py --root .bench

Sizes 0.1B, 0.5B, 1.1B (base + 3 fine-tunes) and 2, 4, 8 fine-tunes at 0.1B, for
linear and ties, beside the read-sum-write baseline of the same bytes; medians of
--repeats runs, stored under "scaling" in docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from generate import generate
from run import bench_baseline, bench_tool, warm

from alloykit.testing.fixtures import SIZES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(".bench"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks.json"))
    a = ap.parse_args()
    work = a.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    size_pts: dict[str, list] = {"read-sum-write": [], "alloykit linear": [], "alloykit ties": []}
    for size in ("0.1b", "0.5b", "1.1b"):
        root = a.root / size
        generate(size, 3, root)
        warm(root)
        n = SIZES[size].num_params / 1e9
        size_pts["read-sum-write"].append((n, bench_baseline("read-sum-write", root, work, a.repeats)["wall_median"]))
        for m in ("linear", "ties"):
            size_pts[f"alloykit {m}"].append((n, bench_tool("alloykit", m, root, work, a.repeats)["wall_median"]))
    input_pts: dict[str, list] = {"read-sum-write": [], "alloykit linear": [], "alloykit ties": []}
    root = a.root / "0.1b-8"
    generate("0.1b", 8, root)
    warm(root)
    for k in (2, 4, 8):
        input_pts["read-sum-write"].append((k, bench_baseline("read-sum-write", root, work, a.repeats, k=k)["wall_median"]))
        for m in ("linear", "ties"):
            input_pts[f"alloykit {m}"].append((k, bench_tool("alloykit", m, root, work, a.repeats, n=k)["wall_median"]))
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    results["scaling"] = {"size": size_pts, "inputs": input_pts, "inputs_size": "0.1B", "statistic": f"median of {a.repeats}"}
    a.results.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
