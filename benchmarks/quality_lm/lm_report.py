"""docs/results-lm.md and its plots from the causal-LM track's results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm_score import bootstrap, from_lists, summary

GROUP_TITLES = {
    "reference": "Reference models", "merge": "Merges of the full fine-tunes", "search": "Searched coefficients (AdaMerging)",
    "lora-reference": "LoRA fine-tunes (base + adapter)", "lora-merge": "Merges of the LoRA fine-tunes",
}


def _per(row: dict) -> dict:
    return {t: from_lists(v) for t, v in row["tasks"].items()}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(c: list[float], pct: bool = True) -> str:
    return f"[{_pct(c[0])}, {_pct(c[1])}]" if pct else f"[{c[0]:.3f}, {c[1]:.3f}]"


def row_stats(results: dict) -> dict[str, dict]:
    out = {}
    for name, row in results["rows"].items():
        per = _per(row)
        s = {t: summary(v) for t, v in per.items()}
        out[name] = {"summary": s, "ci": bootstrap(per), "acc": float(np.mean([v["acc"] for v in s.values()])),
                     "loss": float(np.mean([v["loss"] for v in s.values()]))}
    return out


def table(results: dict, stats: dict, names: list[str]) -> list[str]:
    tasks = results["tasks"]
    ft = {t: stats[f"finetuned:{t}"]["summary"][t]["acc"] for t in tasks if f"finetuned:{t}" in stats}
    head = "| row | " + " | ".join(f"{t} acc" for t in tasks) + " | mean acc [95% CI] | normalized | mean loss [95% CI] | scale |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for n in names:
        s, ci, row = stats[n], stats[n]["ci"], results["rows"][n]
        cells = [f"{_pct(s['summary'][t]['acc'])} {_ci(ci[t]['acc_ci'])}" for t in tasks]
        norm = np.mean([s["summary"][t]["acc"] / ft[t] for t in tasks]) if len(ft) == len(tasks) else float("nan")
        scale = "" if row.get("scale") is None else f"{row.get('knob')} {row['scale']:g}"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | **{_pct(s['acc'])}** {_ci(ci['mean']['acc_ci'])} | {100 * norm:.0f}% | "
                     f"{s['loss']:.3f} {_ci(ci['mean']['loss_ci'], pct=False)} | {scale} |")
    return lines


def loss_table(results: dict, stats: dict) -> list[str]:
    tasks = results["tasks"]
    lines = ["| row | " + " | ".join(f"{t} loss" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for n in results["rows"]:
        s, ci = stats[n]["summary"], stats[n]["ci"]
        lines.append(f"| {n} | " + " | ".join(f"{s[t]['loss']:.3f} {_ci(ci[t]['loss_ci'], pct=False)}" for t in tasks) + " |")
    return lines


def paired(results: dict, a: str, b: str) -> dict:
    return bootstrap(_per(results["rows"][a]), other=_per(results["rows"][b]))["mean"]


def comparisons(results: dict, stats: dict, names: list[str], refs: list[str]) -> list[str]:
    refs = [r for r in refs if r in results["rows"]]
    head = [f"mean acc − {r} [95% CI]" for r in refs] + [f"mean loss − {r} [95% CI]" for r in refs]
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for n in names:
        acc, loss = [], []
        for r in refs:
            if n == r:
                acc.append("")
                loss.append("")
                continue
            pc = paired(results, n, r)
            c, d = pc["acc_ci"], stats[n]["acc"] - stats[r]["acc"]
            mark = " (better)" if c[0] > 0 else " (worse)" if c[1] < 0 else ""
            acc.append(f"{100 * d:+.1f} [{100 * c[0]:+.1f}, {100 * c[1]:+.1f}]{mark}")
            c, d = pc["loss_ci"], stats[n]["loss"] - stats[r]["loss"]
            mark = " (better)" if c[1] < 0 else " (worse)" if c[0] > 0 else ""
            loss.append(f"{d:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]{mark}")
        lines.append(f"| {n} | " + " | ".join(acc + loss) + " |")
    return lines


def plot(results: dict, stats: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "#777777", "merge": "#1f77b4", "search": "#2ca02c", "lora-reference": "#bbbbbb", "lora-merge": "#ff7f0e"}
    names = list(results["rows"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    acc = [100 * stats[n]["acc"] for n in names]
    lo = [100 * (stats[n]["acc"] - stats[n]["ci"]["mean"]["acc_ci"][0]) for n in names]
    hi = [100 * (stats[n]["ci"]["mean"]["acc_ci"][1] - stats[n]["acc"]) for n in names]
    ax.barh(y, acc, xerr=[lo, hi], color=[colors[results["rows"][n]["group"]] for n in names], capsize=2)
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(100 * stats["base"]["acc"], color="k", lw=0.8, ls=":", label="base")
    ax.axvline(25, color="r", lw=0.8, ls="--", label="chance (4 choices)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: bars reach the right edge
    ax.set_xlabel("mean multiple-choice accuracy over the skills (%), 95% bootstrap CI")
    ax.set_title(f"{results['base']} as base: {len(results['tasks'])} skills, fine-tuned and merged", fontsize=9)
    fig.tight_layout()
    p1 = out.with_suffix(".png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    grid = np.array([[100 * stats[n]["summary"][t]["acc"] for t in tasks] for n in names])
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w" if grid[i, j] < grid.max() * 0.75 else "k")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title("accuracy per skill (held-out test examples)", fontsize=9)
    fig.tight_layout()
    p2 = out.parent / (out.stem + "-tasks.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def markdown(results: dict, plots: list[Path], header: str, footer: str) -> str:
    stats = row_stats(results)
    by_group: dict[str, list[str]] = {}
    for n, row in results["rows"].items():
        by_group.setdefault(row["group"], []).append(n)
    for g in ("merge", "search", "lora-merge"):
        by_group.get(g, []).sort(key=lambda n: -stats[n]["acc"])
    lines = [header.rstrip(), ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    for g, title in GROUP_TITLES.items():
        if g in by_group:
            lines += [f"### {title}", ""] + table(results, stats, by_group[g]) + [""]
    lines += ["### Loss per skill", "", "The true target's negative log-likelihood per token (lower is better), "
              "95% bootstrap interval:", ""] + loss_table(results, stats) + [""]
    merges = by_group.get("merge", []) + by_group.get("search", [])
    if merges:
        lines += ["### Paired differences (same test examples, bootstrap over them)", "",
                  "Marked better/worse only where the 95% interval of the difference excludes 0 (loss: lower is better).", ""]
        lines += comparisons(results, stats, merges, ["task_arithmetic", "linear", "base"]) + [""]
    lora = by_group.get("lora-merge", [])
    if lora:
        lines += comparisons(results, stats, lora, ["lora task_arithmetic", "base"]) + [""]
    gens = results.get("generations") or {}
    if gens.get("outputs"):
        names = list(gens["outputs"])
        lines += ["### What the models write (greedy, 24 new tokens, first test prompts)", "",
                  "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, prompt in enumerate(gens["prompts"]):
            cells = [_cell(gens["outputs"][n][i]) for n in names]
            lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [footer.rstrip(), ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
