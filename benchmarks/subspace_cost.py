"""Wall time of the subspace / SVD / interference methods against task_arithmetic, same run.

    python benchmarks/subspace_cost.py --root .bench/0.5b --out docs/subspace_cost.json

Each method merges base + 3 fine-tunes (bf16 output) as an ``alloykit merge``
subprocess, one at a time, page cache warm (``run.py``'s ``measure``: wall, CPU, peak
anonymous RSS). ``--breakdown`` also times each method's function in-process, on one
thread, on one decoder layer's matrices and the embedding: where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ALLOYKIT, measure, warm  # noqa: E402

#: label -> (merge_method, shared parameters)
VARIANTS: dict[str, tuple[str, dict]] = {
    "task_arithmetic": ("task_arithmetic", {}),
    "tsv_m": ("tsv_m", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "cart": ("cart", {}),
    "pcb": ("pcb", {}),
    "wudi closed_form": ("wudi", {"solver": "closed_form"}),
    "wudi adam": ("wudi", {"solver": "adam"}),  # steps set by --adam-steps
    "emr": ("emr", {}),
}


def recipe(method: str, shared: dict, root: Path) -> dict:
    r = {"merge_method": method, "base_model": str(root / "base"), "dtype": "bfloat16",
         "models": [{"model": str(root / f"ft{i + 1}"), **({"parameters": {"weight": 1.0}} if method == "task_arithmetic" else {})}
                    for i in range(3)]}
    if shared:
        r["parameters"] = shared
    return r


def breakdown(root: Path, label: str, method: str, shared: dict) -> dict[str, float]:
    """CPU seconds of the method's function alone on layer 0's tensors and the embedding (1 thread)."""
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.methods import get_method
    from alloykit.methods.registry import MergeInput

    spec = get_method(method)
    cks = [Checkpoint(root / n) for n in ("base", "ft1", "ft2", "ft3")]
    names = [n for n in cks[0].tensors if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    names.append("model.embed_tokens.weight")
    times = {}
    torch.set_num_threads(1)
    for name in names:
        base = cks[0].read(name).float()
        stack = torch.stack([c.read(name).float() for c in cks[1:]])
        mps = [spec.model_params.model_validate({"weight": 1.0} if "weight" in spec.model_params.model_fields else {}) for _ in range(3)]
        x = MergeInput(name, stack, base, spec.params.model_validate(shared), mps, owned=True)
        t0 = time.thread_time()  # CPU time of this thread (torch runs on it with 1 thread): robust to a busy machine
        spec.fn(x)
        times[name.removeprefix("model.").removeprefix("layers.0.")] = time.thread_time() - t0
    for c in cks:
        c.close()
    print(f"  breakdown {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()), flush=True)
    return times


def table(results: dict) -> str:
    """Markdown table of a results file: seconds and ratios to task_arithmetic (wall and CPU)."""
    ref = results["task_arithmetic"]
    rows = ["| method | wall s | CPU s | wall / task_arithmetic | CPU / task_arithmetic | anon RSS GB | slowest tensor of layer 0 (function alone, 1 thread, CPU s) |",
            "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if label == "machine":
            continue
        params = ", ".join(f"{k}={v}" for k, v in r.get("parameters", {}).items())
        worst = max(r.get("breakdown", {}).items(), key=lambda kv: kv[1], default=None)
        rows.append(f"| {label}{f' ({params})' if params and label != 'wudi closed_form' else ''} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                    f"{r['wall'] / ref['wall']:.1f}x | {r['cpu'] / ref['cpu']:.1f}x | {r['rss_anon'] / 1e9:.2f} | "
                    + (f"{worst[0]} {worst[1]:.2f} s" if worst else "-") + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="folder with base, ft1, ft2, ft3 (benchmarks/generate.py)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the outputs (default: ROOT/../subspace-work)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    ap.add_argument("--only", default="", help="comma-separated labels (default: all)")
    ap.add_argument("--adam-steps", type=int, default=300, help="Adam steps of 'wudi adam' (cost is linear in the steps)")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(a.out.read_text())))
        return
    work = a.work or a.root.parent / "subspace-work"
    work.mkdir(parents=True, exist_ok=True)
    labels = [s.strip() for s in a.only.split(",") if s.strip()] or list(VARIANTS)
    warm(a.root)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "root": str(a.root)}
    for label in labels:
        method, shared = VARIANTS[label]
        if label == "wudi adam":
            shared = {**shared, "steps": a.adam_steps}
        rfile = work / "recipe.yaml"
        rfile.write_text(yaml.safe_dump(recipe(method, shared, a.root)))
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        run = measure(ALLOYKIT + ["merge", str(rfile), str(out), "-q"], env=dict(os.environ, HF_HUB_OFFLINE="1"))
        shutil.rmtree(out, ignore_errors=True)
        run["parameters"] = shared
        print(f"  {label:18s} {run['wall']:8.1f}s  cpu {run['cpu']:8.1f}s  anon {run['rss_anon'] / 1e9:.2f} GB", flush=True)
        if a.breakdown:
            run["breakdown"] = breakdown(a.root, label, method, shared)
        results[label] = run
        a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
