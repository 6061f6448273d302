"""Rewrite the measured tables of docs/alignment.md and the path plots from the experiments' JSON (no computation).

    python benchmarks/alignment/report.py

Reads docs/alignment/vision.json, docs/alignment/text-bert-h128/lmc.json and
docs/alignment/finetunes.json (whichever exist) and replaces the text between
``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PATHS = ("naive", "naive+repair", "weight_matching", "weight_matching+repair", "activation_matching",
         "activation_matching+repair")
LABEL = {"naive": "as trained", "naive+repair": "as trained + REPAIR", "weight_matching": "weight matching",
         "weight_matching+repair": "weight matching + REPAIR", "activation_matching": "activation matching",
         "activation_matching+repair": "activation matching + REPAIR"}


def se(acc: float, n: int) -> float:
    return 100 * math.sqrt(max(acc * (1 - acc), 0) / n)


def pair_table(paths: dict, n: int) -> list[str]:
    a0, a1 = paths["naive"]["accuracy"][0], paths["naive"]["accuracy"][-1]
    lines = [f"Endpoints: {100 * a0:.2f}% and {100 * a1:.2f}% test accuracy (n = {n}; one standard error "
             f"{se((a0 + a1) / 2, n):.2f} points).", "",
             "| path | accuracy barrier (points) | loss barrier | midpoint accuracy |", "|---|---:|---:|---:|"]
    for key in PATHS:
        if key not in paths:
            continue
        p = paths[key]
        mid = p["accuracy"][len(p["alpha"]) // 2]
        lines.append(f"| {LABEL[key]} | {100 * p['accuracy_barrier']:.2f} | {p['loss_barrier']:.3f} | "
                     f"{100 * mid:.2f}% ± {se(mid, n):.2f} |")
    return lines


def vision(lines: list[str]) -> None:
    path = DOCS / "alignment" / "vision.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    from alloykit.align.plots import plot_paths

    for name, res in data["pairs"].items():
        png = f"lmc-{name.split()[0]}-s{''.join(str(s) for s in res['seeds'])}.png"
        plot_paths(res["paths"], DOCS / "alignment" / png, f"{name}: test loss / accuracy along the linear path")
        lines += ["", f"**{name}** ({res['epochs']} epochs; alignment wall time "
                      f"{', '.join(f'{k.replace(chr(95), chr(32))} {v} s' for k, v in res['align_seconds'].items())} on the "
                      f"contended machine; {res['cpu_seconds']} CPU s for all paths of the pair)", ""]
        lines += pair_table(res["paths"], res["test_examples"])
        lines += ["", f"![{name}](alignment/{png})"]
    if "width" in data:
        lines += ["", "**Barrier against width** (Fashion-MNIST MLP, 3 hidden layers, seeds 0 and 1, 5 epochs; "
                      "accuracy barrier in points / loss barrier):", "",
                  "| width | endpoints | as trained | weight matching | weight matching + REPAIR |", "|---:|---|---:|---:|---:|"]
        for r in data["width"]:
            e = r["naive"]["endpoint_accuracy"]
            cells = [f"{100 * r[k]['accuracy_barrier']:.2f} / {r[k]['loss_barrier']:.3f}"
                     for k in ("naive", "weight_matching", "weight_matching+repair")]
            lines.append(f"| {r['width']} | {100 * e[0]:.1f}%, {100 * e[1]:.1f}% | " + " | ".join(cells) + " |")
        lines += ["", "![barrier against width](alignment/barrier-vs-width.png)"]


def text(lines: list[str]) -> None:
    path = DOCS / "alignment" / "text-bert-h128" / "lmc.json"
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    from alloykit.align.plots import plot_paths

    plot_paths(r["paths"], path.parent / "lmc.png", "BERT-shaped encoders from scratch, seeds 0 and 1: test loss / accuracy")
    t = r.get("training", [{}])[0]
    lines += ["", f"**BERT-shaped encoder from scratch** (WordNet noun supersenses, 26 classes; hidden {t.get('hidden')}, "
                  f"2 layers, 4 heads; {t.get('steps')} steps of batch {t.get('batch_size')}, seeds "
                  f"{', '.join(str(x.get('seed')) for x in r.get('training', []))}; {t.get('cpu_seconds')} CPU s per model):", "",
              f"`{r.get('command', '')}`", ""]
    lines += pair_table(r["paths"], r["examples"])
    moved = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("moved_fraction", {}).items())
    lines += ["", f"Units moved by the alignment: {moved}.", "", "![lmc](alignment/text-bert-h128/lmc.png)"]
    if "recipes" in r:
        lines += ["", "The recipe step on the same pair (`alloykit merge recipe.yaml out`, the merged model evaluated on the "
                      "same test split):", "", "| recipe | test accuracy | test loss | merge time |", "|---|---:|---:|---:|"]
        for name, v in r["recipes"].items():
            lines.append(f"| {name} | {100 * v['accuracy']:.2f}% ± {100 * v['stderr']:.2f} | {v['loss']:.3f} | "
                         f"{v['merge_seconds']} s |")


def finetunes(lines: list[str]) -> None:
    path = DOCS / "alignment" / "finetunes.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    lines += ["", "**Fine-tunes of one base** (all-MiniLM-L6-v2, 250 steps each; residual stream included):", "",
              "| pair | method | identity found? | units moved (residual / heads / MLP) |", "|---|---|---|---|"]
    for row in data["pairs"].values():
        for method in ("weight_matching", "activation_matching"):
            m = row[method]
            moved = " / ".join(f"{100 * m['moved_fraction'].get(k, 0):.1f}%" for k in ("residual", "attention", "mlp"))
            lines.append(f"| {row['a']} vs {row['b']} | {method.replace('_', ' ')} | {'yes' if m['identity'] else 'no'} | {moved} |")
    from alloykit.align.plots import plot_paths

    for row in data["pairs"].values():
        if "paths" in row:
            plot_paths(row["paths"], DOCS / "alignment" / "lmc-minilm-finetunes.png",
                       f"MiniLM fine-tunes ({row['a']}, {row['b']}): test loss / accuracy")
            lines += ["", f"Linear path between {row['a']} and {row['b']} (encoder and head interpolated):", ""]
            lines += pair_table(row["paths"], row["test_examples"])
            lines += ["", "![minilm fine-tunes](alignment/lmc-minilm-finetunes.png)"]


def main() -> None:
    lines: list[str] = []
    vision(lines)
    text(lines)
    finetunes(lines)
    doc = DOCS / "alignment.md"
    s = doc.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head, rest = s.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + begin + "\n" + "\n".join(lines).strip("\n") + "\n" + end + tail)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
