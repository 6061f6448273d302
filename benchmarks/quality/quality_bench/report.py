"""docs/results.md and its plots from the results JSON of each track.

Every number on the page is computed here from the JSON (per-example results), so a rebuild
(``run.py --from-json``) gives the same page. Intervals are 95% bootstrap intervals
(:mod:`quality_bench.stats`); an ordering is stated only where the paired interval of the
difference excludes zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quality_bench.rows import BASELINES
from quality_bench.stats import FT, PROBE, TrackStats

# FusionBench, CLIP ViT-B/32, eight image tasks, average accuracy (its documentation; /work/shared/anchors.md)
FUSIONBENCH = {"fine-tuned": 90.3, "multi-task": 88.6, "pretrained": 48.2, "linear": 66.5,
               "task_arithmetic": 68.0, "ties": 72.2, "fisher": 70.6, "regmean": 82.4, "regmean_plus_plus": 84.4,
               "adamerging_task": 68.7, "adamerging_layer": 82.6, "iso_c": 82.8, "iso_cts": 82.7, "wudi": 84.5}
FUSIONBENCH_NAMES = {"linear": "simple average", "task_arithmetic": "task arithmetic", "ties": "TIES", "fisher": "Fisher",
                     "regmean": "RegMean", "regmean_plus_plus": "RegMean++", "adamerging_task": "AdaMerging task-wise",
                     "adamerging_layer": "AdaMerging layer-wise", "iso_c": "ISO-C", "iso_cts": "ISO-CTS", "wudi": "WUDI"}
TITLES = {"text": "Text track: MiniLM, {n} text tasks", "image": "Image track: a small ViT pre-trained here, {n} image tasks"}


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}"


def ci(iv) -> str:
    return f"{pct(iv.est)} [{pct(iv.lo)}, {pct(iv.hi)}]"


def diff_ci(c: dict) -> str:
    """A paired comparison (``TrackStats.compare``): the difference and its 95% interval."""
    return f"{pct(c['diff'])} [{pct(c['lo'])}, {pct(c['hi'])}]"


def ok_rows(results: dict) -> list[str]:
    return [n for n, r in results["rows"].items()
            if any(s.get("status") == "ok" for s in r.get("seeds", {}).values())]


def methods_of(results: dict, st: TrackStats) -> list[str]:
    """Non-baseline rows that ran, best first."""
    names = [n for n in ok_rows(results) if n not in BASELINES]
    return sorted(names, key=lambda n: -st.interval(n).est)


def chosen(results: dict, name: str) -> str:
    seeds = results["rows"][name]["seeds"]
    first = seeds[min(seeds, key=int)]
    edge = first.get("at_grid_edge")
    return (first.get("chosen") or "") + (f" (grid edge: {', '.join(edge)})" if edge else "")


def headroom_table(results: dict, st: TrackStats) -> tuple[list[str], dict]:
    tv = results.get("task_vectors", {}).get("per_task", {})
    lines = ["| task | fine-tuned | linear probe | gap (fine-tuned - probe) | pretrained + fine-tuned heads | "
             "\\|tau\\| / \\|theta_0\\| (per seed) |", "|---|---|---|---|---|---|"]
    gaps = []
    if not st.supports("gain"):  # a run without the fine-tuned or the linear-probe row (e.g. --rows without them)
        return ["The headroom table needs the `fine-tuned (individual)` and `pretrained + linear probe` rows, "
                "which this run did not have."], {"gap": None, "gap_ci": None}
    for t in st.tasks:  # the probe does not depend on the fine-tuning seed
        ft, probe = st.per_task(FT, t), st.per_task(PROBE, t)
        base = st.per_task("pretrained + fine-tuned heads", t) if "pretrained + fine-tuned heads" in st.correct else None
        gaps.append(ft.est - probe.est)
        norms = ", ".join(f"{x:.3f}" for x in tv.get(t, {}).get("relative_norm", []))
        lines.append(f"| {t} | {ci(ft)} | {ci(probe)} | {pct(ft.est - probe.est)} | {ci(base) if base else '-'} | {norms} |")
    gap = st.compare(FT, PROBE) if PROBE in st.correct else None
    ft_all, probe_all = st.interval(FT), st.interval(PROBE)
    lines.append(f"| **average** | **{ci(ft_all)}** | **{ci(probe_all)}** | **{pct(np.mean(gaps))}**"
                 + (f" [{pct(gap['lo'])}, {pct(gap['hi'])}]" if gap and gap.get("diff") is not None else "") + " | | |")
    return lines, {"gap": float(np.mean(gaps)), "gap_ci": gap}


def main_table(results: dict, st: TrackStats) -> list[str]:
    lines = ["| model | accuracy | normalized | gain kept | seeds | chosen on validation (seed 0) |", "|---|---|---|---|---|---|"]
    base = [n for n in BASELINES if n in st.correct]
    for n in base + methods_of(results, st):
        label = n if n in BASELINES else f"`{n}`"
        seeds = st.seeds(n)
        norm = "-" if n == PROBE else ci(st.interval(n, "normalized")) if st.supports("normalized") else "n/a"
        gain = ("100" if n == FT else "0") if n in (FT, PROBE) else ci(st.interval(n, "gain")) if st.supports("gain") else "n/a"
        lines.append(f"| {label} | **{ci(st.interval(n))}** | {norm} | {gain} | {len(seeds)} | {chosen(results, n)} |")
    return lines


def per_task_table(results: dict, st: TrackStats, metric: str) -> list[str]:
    if not st.supports(metric):
        return [f"n/a: needs the `{FT}` and `{PROBE}` rows, which this run did not have."]
    lines = ["| model | " + " | ".join(st.tasks) + " | avg |", "|---|" + "---|" * (len(st.tasks) + 1)]
    names = [n for n in BASELINES if n in st.correct and (metric == "accuracy" or n not in (FT, PROBE))] + methods_of(results, st)
    for n in names:
        vals = [st.per_task(n, t, metric).est for t in st.tasks]
        avg = st.interval(n, metric).est
        lines.append(f"| {n if n in BASELINES else f'`{n}`'} | " + " | ".join(pct(v) for v in vals) + f" | **{pct(avg)}** |")
    return lines


def ordering_text(results: dict, st: TrackStats) -> list[str]:
    names = methods_of(results, st)
    chain = st.ordering(names)
    parts = []
    for name, rel, _ in chain:
        parts.append(f"`{name}`" + (f" {rel} " if rel else ""))
    resolved = sum(1 for _, rel, _ in chain[:-1] if rel == ">")
    # how many of all pairs are resolved
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    n_res = sum(1 for a, b in pairs if st.compare(a, b)["resolved"])
    return ["Best first; `>`: the paired 95% interval of the difference excludes 0 (resolved); `~`: not resolved. "
            f"{resolved} of {len(chain) - 1} neighbouring pairs and {n_res} of {len(pairs)} pairs are resolved.", "",
            "".join(parts)]


#: (search row, the task arithmetic row with as many validation evaluations)
BUDGET_PAIRS = [("evolve", "task_arithmetic_64", 64), ("evolve_6", "task_arithmetic", 6)]


def budget_section(st: TrackStats) -> list[str]:
    """The evolutionary search against task arithmetic given as many validation evaluations (issue 18's test)."""
    lines = []
    for search, ta, evals in BUDGET_PAIRS:
        if search in st.correct and ta in st.correct:
            c = st.compare(search, ta)
            verdict = ("resolved: evolve is better" if c["resolved"] and c["diff"] > 0 else
                       "resolved: task arithmetic is better" if c["resolved"] else "not resolved")
            lines.append(f"| {evals} | `{search}` {ci(st.interval(search))} | `{ta}` {ci(st.interval(ta))} | "
                         f"{diff_ci(c)} | {verdict} | {len(c['seeds'])} |")
    if not lines:
        return []
    return ["### Evolutionary search against task arithmetic at the same budget", "",
            "Both choose on validation only, with the same number of merges scored there: task arithmetic spends "
            "them on its one coefficient (a grid), the search on a weight and a density per model and a method gene. "
            "Paired difference on the test examples (95%), over the fine-tuning seeds both rows ran on.", "",
            "| validation evaluations | search | task arithmetic | difference | | seeds |", "|---|---|---|---|---|---|",
            *lines, ""]


#: rows that are not one merged model: per-task masks and rescalers (the task must be known at inference)
TASK_AWARE = {"emr"}


def routing_section(results: dict, st: TrackStats) -> list[str]:
    """Routed rows against the best single merged model, with what routing costs (issue 14)."""
    ranked = methods_of(results, st)
    routed = [n for n in ranked if results["rows"][n].get("kind") == "routing"]
    static = [n for n in ranked if results["rows"][n].get("kind") != "routing" and n not in TASK_AWARE]
    if not routed or not static:
        return []
    best = static[0]  # methods_of sorts best first
    lines = ["### Routed models against the best single merged model", "",
             f"A routed model keeps the fine-tunes' updates apart and mixes them per input: it is not one model, and it "
             f"costs parameters and inference time (measured against one dense model, same inputs, same process). "
             f"Best single merged model here: `{best}` {ci(st.interval(best))}. Paired difference on the test examples (95%).", "",
             "| routed row | accuracy | minus the best single merge | parameters | inference CPU time |", "|---|---|---|---|---|"]
    for n in routed:
        c = st.compare(n, best)
        cost = next(iter(results["rows"][n]["seeds"].values())).get("cost", {})
        verdict = " (resolved)" if c["resolved"] else " (not resolved)"
        lines.append(f"| `{n}` | {ci(st.interval(n))} | {diff_ci(c)}{verdict} | "
                     f"{cost.get('parameters', float('nan')):.2f}x | {cost.get('inference_cpu', float('nan')):.1f}x |")
    aware = [n for n in TASK_AWARE if n in st.correct]
    if aware:
        lines += ["", "Not counted as a single merge: " + ", ".join(f"`{n}` {ci(st.interval(n))}" for n in aware)
                  + " (one merged model plus a mask and a rescaler per task: the task must be named at inference)."]
    return lines + [""]


def fusionbench_section(results: dict, st: TrackStats) -> list[str]:
    shared = [n for n in FUSIONBENCH_NAMES if n in st.correct]
    if len(shared) < 2:
        return ["Too few rows shared with FusionBench ran to compare orderings."]
    ft = st.interval(FT).est
    lines = ["| method | FusionBench avg | FusionBench normalized | here accuracy | here normalized |", "|---|---|---|---|---|"]
    for n in sorted(shared, key=lambda n: -FUSIONBENCH[n]):
        lines.append(f"| {FUSIONBENCH_NAMES[n]} (`{n}`) | {FUSIONBENCH[n]:.1f} | {100 * FUSIONBENCH[n] / FUSIONBENCH['fine-tuned']:.1f} "
                     f"| {ci(st.interval(n))} | {ci(st.interval(n, 'normalized'))} |")
    lines.append(f"| fine-tuned (individual) | {FUSIONBENCH['fine-tuned']:.1f} | 100 | {pct(ft)} | 100 |")
    agree, disagree, unresolved = [], [], []
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            fb = FUSIONBENCH[a] - FUSIONBENCH[b]
            c = st.compare(a, b)
            desc = f"{a} vs {b} ({100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] here, {fb:+.1f} there)"
            if not c["resolved"]:
                unresolved.append(desc)
            elif c["diff"] * fb > 0:
                agree.append(desc)
            else:
                disagree.append(desc)
    n = len(agree) + len(disagree) + len(unresolved)
    lines += ["", f"Of the {n} pairs of these methods, {len(agree)} are resolved here and ordered as in FusionBench, "
              f"{len(disagree)} are resolved here and ordered the other way, and {len(unresolved)} are not resolved here "
              "(FusionBench publishes single runs without intervals; a gap of a point or two there may not be resolved either).", ""]
    for title, items in (("Resolved, same order as FusionBench", agree), ("Resolved, opposite order", disagree),
                         ("Not resolved here", unresolved)):
        if items:
            lines.append(f"- {title}: " + "; ".join(items) + ".")
    return lines


def study_section(results: dict, plots: dict[str, str]) -> list[str]:
    s = results.get("adamerging_study")
    if not s:
        return []
    rows = results["rows"]
    sm = s["summary"]
    out = ["### The AdaMerging experiment", "",
           f"Inputs: {s['inputs']} (labels used only to score). Scan: task arithmetic with one lambda for every model; "
           "paths: the coefficients AdaMerging held every few steps of its search.", "",
           "| task | entropy-accuracy rank correlation, lambda scan | lambda of least entropy | lambda of best accuracy | "
           + " | ".join(f"{p}: entropy change, accuracy change (rank corr.)" for p in s["paths"]) + " | error AUROC of entropy at lambda "
           f"{results['search']['init']} |", "|---|---|---|---|" + "---|" * len(s["paths"]) + "---|"]
    for t in s["tasks"]:
        r = sm["per_task"][t]
        cells = [f"{r['scan_spearman']:+.2f}" if r["scan_spearman"] is not None else "-",
                 f"{r['scan_argmin_entropy']:.1f}", f"{r['scan_argmax_accuracy']:.1f}"]
        for p in s["paths"]:
            sp = r.get(f"{p}_spearman")
            cells.append(f"{r[f'{p}_entropy_change']:+.3f}, {100 * r[f'{p}_accuracy_change']:+.1f} pts "
                         f"({sp:+.2f})" if sp is not None else f"{r[f'{p}_entropy_change']:+.3f}, {100 * r[f'{p}_accuracy_change']:+.1f} pts")
        au = s["error_auroc_at_init"].get(t)
        cells.append(f"{au:.2f}" if au is not None else "-")
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    out += ["", f"Summed over tasks, the lambda of least entropy in the scan is {sm['scan_argmin_summed_entropy']:.1f} and the "
            f"lambda of best mean accuracy is {sm['scan_argmax_mean_accuracy']:.1f}.", "", study_conclusion(results), ""]
    for title in ("AdaMerging study: entropy against accuracy per task",):
        if title in plots:
            out += [f"![{title}]({plots[title]})", ""]
    del rows
    return out


def study_conclusion(results: dict) -> str:
    """What the study's numbers say about AdaMerging's premise on this track, in words."""
    s = results["adamerging_study"]
    per = s["summary"]["per_task"]
    tasks = s["tasks"]
    good = [t for t in tasks if (per[t]["scan_spearman"] or 0) <= -0.5]
    bad = [t for t in tasks if (per[t]["scan_spearman"] or 0) >= 0.5]
    au = [v for v in s["error_auroc_at_init"].values() if v is not None]
    parts = [f"Along task arithmetic's lambda, lower entropy went with higher accuracy (rank correlation <= -0.5) on "
             f"{len(good)} of {len(tasks)} tasks" + (f" ({', '.join(good)})" if good else "")
             + (f", and with LOWER accuracy (>= +0.5) on {len(bad)} ({', '.join(bad)})" if bad else "") + "."]
    if au:
        parts.append(f"At the starting point an example's entropy separates its errors from its correct predictions with "
                     f"AUROC {min(au):.2f} to {max(au):.2f} (0.5 is chance): entropy "
                     + ("does mark errors" if min(au) > 0.6 else "marks errors weakly on some tasks") + ".")
    for name, p in s["paths"].items():
        de = [per[t][f"{name}_entropy_change"] for t in tasks]
        da = [per[t][f"{name}_accuracy_change"] for t in tasks]
        fell = [t for t, e, a in zip(tasks, de, da) if e < 0 and a < 0]
        parts.append(f"{name}: over its search the summed entropy went from {sum(p['entropy'][0].values()):.3f} to "
                     f"{sum(p['entropy'][-1].values()):.3f} and mean accuracy from {100 * np.mean(list(p['accuracy'][0].values())):.1f} "
                     f"to {100 * np.mean(list(p['accuracy'][-1].values())):.1f}%; on {len(fell)} task(s) entropy fell while "
                     "accuracy fell too" + (f" ({', '.join(fell)})" if fell else "") + ".")
    return " ".join(parts)


def track_section(results: dict, plots: dict[str, str], n_boot: int = 2000) -> tuple[list[str], dict]:
    st = TrackStats(results, n_boot=n_boot)
    head, summary = headroom_table(results, st)
    cos = results.get("task_vectors", {}).get("mean_pairwise_cosine", [])
    out = [f"## {TITLES.get(results['track'], results['track']).format(n=len(results['tasks']))}", "",
           f"Made by `{results.get('command', '')}`" + (f", then {len(results.get('updates', []))} `--update` run(s) (listed below)"
                                                        if results.get("updates") else "") + ".", "",
           "### Headroom: how far fine-tuning moved", "", *head, "",
           f"Mean pairwise cosine between the task vectors of one seed: {', '.join(f'{c:.3f}' for c in cos)} (per seed).", "",
           "### Results (test accuracy, %, 95% intervals)", "",
           "Accuracy: mean over tasks. Normalized: merged / fine-tuned per task, averaged. Gain kept: (merged - probe) / "
           "(fine-tuned - probe) on the task averages (per task in its own table below): 0 is a linear probe on the frozen base, 100 is the fine-tunes. "
           "Rows with several seeds ran on each seed's fine-tunes (the interval resamples seeds and test examples); rows with 1 "
           "seed ran on seed 0's (test examples only).", "", *main_table(results, st), ""]
    na = {n: r for n, r in results["rows"].items() if n not in st.correct}
    if na:
        out += ["Not in the table: " + "; ".join(
            f"`{n}` ({next(iter(r['seeds'].values())).get('reason', '?')})" for n, r in na.items()) + ".", ""]
    for title in ("accuracy and gain kept with 95% intervals",):
        if title in plots:
            out += [f"![{title}]({plots[title]})", ""]
    out += ["### Ordering", "", *ordering_text(results, st), "", *routing_section(results, st), *budget_section(st),
            "### Per task: accuracy (%, mean over the row's seeds)", "", *per_task_table(results, st, "accuracy"), "",
            "### Per task: fraction of the fine-tuning gain kept (%)", "", *per_task_table(results, st, "gain"), ""]
    if "per-task accuracy" in plots:
        out += [f"![per-task accuracy]({plots['per-task accuracy']})", ""]
    if results.get("curve"):
        tasks = st.tasks
        ks = [p["k"] for p in next(iter(results["curve"].values()))]
        out += ["### Merging the first k tasks (seed 0, normalized accuracy %)", "",
                "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for n, pts in results["curve"].items():
            out.append(f"| `{n}` | " + " | ".join(pct(p["norm_avg"]) for p in pts) + " |")
        out.append("")
        if "curve" in plots:
            out += [f"![normalized accuracy against the number of tasks merged]({plots['curve']})", ""]
        del tasks
    out += ["### Against FusionBench (CLIP ViT-B/32, eight image tasks)", "", *fusionbench_section(results, st), ""]
    out += study_section(results, plots)
    out += setup_section(results)
    summary.update(stats=st)
    return out, summary


def setup_section(results: dict) -> list[str]:
    cfg = results["config"]
    rec = cfg["recipe"]
    out = ["### Setup", "", "| task | data | classes | train | val | test |", "|---|---|---|---|---|---|"]
    for t, d in results["tasks"].items():
        out.append(f"| {t} | {d['description']} ({d['source']}) | {d['classes']} | {d['train']} | {d['val']} | {d['test']} |")
    frozen = f"; frozen: {', '.join(rec['freeze'])}" if rec.get("freeze") else ""
    out += ["", f"Fine-tuning (per task, seeds {', '.join(map(str, cfg['seeds']))}): {rec['steps']} steps of AdamW, batch "
            f"{rec['batch_size']}, lr {rec['lr']} (head {rec['head_lr']}), weight decay {rec['weight_decay']}, "
            f"{int(100 * rec['warmup'])}% warmup then {rec['decay']} decay{frozen}"
            + (f", max_len {rec['max_len']} tokens" if rec.get("max_len") else "") + ". "
            + (f"Multi-task model: {cfg['joint_steps']} round-robin steps, seed 0. " if cfg.get("joint_steps") else "")
            + f"Linear probes: up to {cfg['n_probe']} training examples per task. Statistics of fisher/regmean/regmean++: "
            f"{cfg['n_stats']} training examples per task.", ""]
    if results.get("base"):
        b = results["base"]
        out += [f"Base: a ViT ({b['vit']['depth']} blocks, width {b['vit']['dim']}, {b['vit']['patch']}x{b['vit']['patch']} patches) "
                f"pre-trained by SimMIM for {b['recipe']['epochs']} epochs on {b['images']} unlabelled images (the training "
                f"images of every source, augmented), final masked-pixel L1 {b['final_loss']:.4f}; {b['cpu_s'] / 60:.1f} CPU-min.", ""]
    s = results.get("search", {})
    out += [f"Searches: AdaMerging {s.get('steps')} Adam steps at lr {s.get('lr')}, init {s.get('init')}, clamp [0, 1], "
            f"batch {s.get('batch_size')} unlabelled {s.get('split')} inputs per task per step (the published setting); "
            "greedy soup on validation accuracy. Grids (`benchmarks/quality/quality_bench/grids.py`) are scored on the "
            "validation split; the best point is scored once on test.", ""]
    tm, cpu = results.get("timings", {}), results.get("cpu_s", {})
    out += [f"Time: {results.get('wall_s', 0) / 60:.1f} min wall, {results.get('total_cpu_s', 0) / 60:.1f} CPU-min ("
            + ", ".join(f"{k} {tm[k] / 60:.1f} / {cpu.get(k, 0) / 60:.1f}" for k in tm) + " min wall / CPU). "
            f"{results['hardware']['cpu']}, {results['hardware']['cores']} cores shared with other jobs (load average "
            f"{results['hardware'].get('load_average_at_start')} at start), torch {results['hardware']['torch']}, "
            f"{results['hardware']['torch_threads']} thread.", ""]
    for u in results.get("updates", []):
        out.append(f"- `--update` ({', '.join(u['rows'])}): `{u['command']}`, {u['seconds'] / 60:.1f} min wall, "
                   f"{u['cpu_s'] / 60:.1f} CPU-min.")
    if results.get("updates"):
        out.append("")
    return out


# -- plots ------------------------------------------------------------------------------------
def plot_track(results: dict, out_dir: Path, prefix: str, n_boot: int = 2000) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = TrackStats(results, n_boot=n_boot)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    names = [n for n in BASELINES if n in st.correct] + methods_of(results, st)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(names) + 1.5), sharey=True)
    for ax, metric, title in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "gain", "gain kept (%)")):
        ys = np.arange(len(names))[::-1]
        for y, n in zip(ys, names):
            if metric == "gain" and (n in (FT, PROBE) or not st.supports("gain")):
                continue
            iv = st.interval(n, metric)
            color = "tab:gray" if n in BASELINES else ("tab:blue" if len(st.seeds(n)) > 1 else "tab:cyan")
            ax.errorbar(100 * iv.est, y, xerr=[[100 * (iv.est - iv.lo)], [100 * (iv.hi - iv.est)]], fmt="o", color=color, ms=4)
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3, axis="x")
    axes[1].axvline(0, color="red", lw=0.8, ls="--")
    axes[1].axvline(100, color="green", lw=0.8, ls="--")
    fig.suptitle(f"{results['track']} track: 95% intervals (blue: every seed, cyan: seed 0, gray: baselines)")
    fig.tight_layout()
    name = f"{prefix}-intervals.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    files["accuracy and gain kept with 95% intervals"] = name

    tasks = st.tasks
    ncol = 4
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 0.22 * len(names) * nrow + 1.2 * nrow), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        ivs = [st.per_task(n, t) for n in names][::-1]
        ax.barh(names[::-1], [100 * i.est for i in ivs], xerr=[[100 * (i.est - i.lo) for i in ivs], [100 * (i.hi - i.est) for i in ivs]],
                color=["tab:gray" if n in BASELINES else "tab:blue" for n in names[::-1]])
        ax.set_title(t, fontsize=9)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_xlim(0, 100)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"{results['track']} track: test accuracy per task (%), 95% intervals")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    name = f"{prefix}-per-task.png"
    fig.savefig(out_dir / name, dpi=80)
    plt.close(fig)
    files["per-task accuracy"] = name

    if results.get("curve"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, pts in results["curve"].items():
            ax.plot([p["k"] for p in pts], [100 * p["norm_avg"] for p in pts], marker="o", label=n)
        ax.set_xlabel("number of tasks merged")
        ax.set_ylabel("normalized accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{prefix}-vs-tasks.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files["curve"] = name

    s = results.get("adamerging_study")
    if s:
        fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), squeeze=False)
        for ax, t in zip(axes.flat, s["tasks"]):
            se = [e[t] for e in s["scan"]["entropy"]]
            sa = [100 * a[t] for a in s["scan"]["accuracy"]]
            ax.plot(se, sa, "-", color="gray", lw=1, label="task arithmetic, lambda 0..1")
            for lam, x, y in zip(s["scan"]["lambda"], se, sa):
                if lam in (0.0, 0.3, 1.0):
                    ax.annotate(f"{lam:g}", (x, y), fontsize=7, color="gray")
            for (pname, p), color in zip(s["paths"].items(), ("tab:orange", "tab:blue")):
                pe = [e[t] for e in p["entropy"]]
                pa = [100 * a[t] for a in p["accuracy"]]
                ax.plot(pe, pa, "o-", ms=3, color=color, label=f"{pname} path")
                ax.plot(pe[-1:], pa[-1:], "s", ms=6, color=color)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("mean entropy (nats)", fontsize=8)
            ax.set_ylabel("accuracy (%)", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(s["tasks"]):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{results['track']} track: entropy against accuracy per task (square: where the search stopped)")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        name = f"{prefix}-adamerging-study.png"
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        files["AdaMerging study: entropy against accuracy per task"] = name
    return files
