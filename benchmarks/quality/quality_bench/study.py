"""Extra measurements on a finished track: the k-task curve and the AdaMerging study.

AdaMerging learns merging coefficients by minimising the entropy of the merged model's
predictions on unlabelled test inputs; its premise (Yang et al., 2024, Sec. 3.2 and their
Fig. 2) is that lower entropy goes with lower loss, i.e. higher accuracy. The study checks
that premise per task on this benchmark's fine-tunes:

* the search path: at checkpoints of the recorded coefficient path, each task's mean
  entropy on its adaptation inputs and its accuracy on the same (labelled) inputs;
* a scan of task arithmetic's single coefficient lambda (0 to 1): entropy and accuracy per
  task, and whether the lambda of least summed entropy is the lambda of best accuracy;
* at AdaMerging's starting point (lambda 0.3 for every model), how well an example's
  entropy separates its errors from its correct predictions (AUROC; 0.5 is chance).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from alloykit.search.adamerging import TaskVectorModel, softmax_entropy
from alloykit.methods.registry import get_method
from quality_bench.bench import Bench
from quality_bench.grids import describe, grid
from quality_bench.rows import moved_parameters


def k_curve(bench: Bench, results: dict, methods: list[str], ks: list[int] | None = None) -> dict[str, list[dict]]:
    """Accuracy and normalized accuracy of merging the first k tasks (seed 0, each method at its chosen point)."""
    seed = bench.track.cfg.seeds[0]
    ft_row = results["rows"].get("fine-tuned (individual)", {}).get("seeds", {}).get(str(seed), {})
    if "test" not in ft_row:  # a --rows subset without the fine-tunes: nothing to normalize by
        bench.log("  k-task curve skipped: it needs the 'fine-tuned (individual)' row on seed "
                  f"{seed}; add it to --rows")
        return {}
    ft = ft_row["test"]
    out: dict[str, list[dict]] = {}
    ks = ks or list(range(2, len(bench.tasks) + 1))
    for name in methods:
        row = results["rows"].get(name, {}).get("seeds", {}).get(str(seed), {})
        if row.get("status") != "ok":
            continue
        point = next(p for p in grid(get_method(name)) if describe(p) == row["chosen"])
        out[name] = []
        for k in ks:
            sub = bench.tasks[:k]
            if k == len(bench.tasks):
                acc = {t: row["test"][t]["accuracy"] for t in sub}
            else:
                acc = {t: float(c.float().mean()) for t, c in bench.merged_scores(name, point, seed, sub, "test")[0].items()}
            out[name].append({"k": k, "tasks": sub, "avg": sum(acc.values()) / k,
                              "norm_avg": sum(acc[t] / ft[t]["accuracy"] for t in sub) / k})
            bench.log(f"    curve {name} k={k}: normalized {100 * out[name][-1]['norm_avg']:.1f}")
    return out


class _Evaluator:
    """Entropy and correctness per example of theta_0 + sum_k lambda_k tau_k on each task's study inputs."""

    def __init__(self, bench: Bench, seed: int, n_eval: int | None):
        tr = bench.track
        self.bench, self.tr = bench, tr
        self.ft = bench.finetunes(seed)
        module = copy.deepcopy(tr.module)
        module.load_state_dict(tr.base_sd)
        self.tv = TaskVectorModel(moved_parameters(module, [self.ft.sd[t] for t in bench.tasks]),
                                  [self.ft.sd[t].__getitem__ for t in bench.tasks])
        split = bench.search.split
        self.data = {t: tr.data(t, split) if n_eval is None else tr.data(t, split).head(n_eval) for t in bench.tasks}

    @torch.no_grad()
    def __call__(self, coefficients: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        sd = dict(self.tr.base_sd)
        sd.update(self.tv.params(coefficients))
        out = {}
        for t, data in self.data.items():
            logits = self.ft.heads[t](self.tr.embed(sd, data))
            out[t] = {"entropy": softmax_entropy(logits).numpy(), "correct": (logits.argmax(-1) == data.labels).numpy()}
        return out


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def adamerging_study(bench: Bench, results: dict, *, n_eval: int | None, path_every: int,
                     scan: tuple[float, ...] = tuple(i / 10 for i in range(11))) -> dict[str, Any]:
    seed = bench.track.cfg.seeds[0]
    ev = _Evaluator(bench, seed, n_eval)
    k = len(bench.tasks)
    out: dict[str, Any] = {"seed": seed, "inputs": f"first {n_eval or 'all'} {bench.search.split} inputs per task",
                           "tasks": bench.tasks, "scan": {"lambda": list(scan), "entropy": [], "accuracy": []}, "paths": {}}

    def record(res, into):
        into["entropy"].append({t: float(r["entropy"].mean()) for t, r in res.items()})
        into["accuracy"].append({t: float(r["correct"].mean()) for t, r in res.items()})

    for lam in scan:
        record(ev(torch.full((k, 1), lam)), out["scan"])
        bench.log(f"    study: lambda {lam:.1f}: summed entropy {sum(out['scan']['entropy'][-1].values()):.3f}, "
                  f"accuracy {100 * np.mean(list(out['scan']['accuracy'][-1].values())):.1f}")
    start = ev(torch.full((k, 1), bench.search.init))
    out["error_auroc_at_init"] = {t: _auroc(r["entropy"], ~r["correct"].astype(bool)) for t, r in start.items()}
    for name in ("adamerging_task", "adamerging_layer"):
        row = results["rows"].get(name, {}).get("seeds", {}).get(str(seed), {})
        if row.get("status") != "ok":
            continue
        s = row["search"]
        steps, path = s["path_steps"], s["path"]
        pick = [i for i, st in enumerate(steps) if st % path_every == 0 or i == len(steps) - 1]
        p = {"step": [steps[i] for i in pick], "entropy": [], "accuracy": [], "coefficient_mean": []}
        for i in pick:
            lam = torch.tensor(path[i])
            record(ev(lam), p)
            p["coefficient_mean"].append(lam.mean(1).tolist())
            bench.log(f"    study: {name} step {steps[i]}: summed entropy {sum(p['entropy'][-1].values()):.3f}, "
                      f"accuracy {100 * np.mean(list(p['accuracy'][-1].values())):.1f}")
        out["paths"][name] = p
    # summaries: per task, rank correlation of entropy with accuracy (negative: entropy is a good proxy)
    summ = {}
    for t in bench.tasks:
        se = [e[t] for e in out["scan"]["entropy"]]
        sa = [a[t] for a in out["scan"]["accuracy"]]
        summ[t] = {"scan_spearman": _spearman(se, sa), "scan_argmin_entropy": scan[int(np.argmin(se))],
                   "scan_argmax_accuracy": scan[int(np.argmax(sa))]}
        for name, p in out["paths"].items():
            pe = [e[t] for e in p["entropy"]]
            pa = [a[t] for a in p["accuracy"]]
            summ[t][f"{name}_spearman"] = _spearman(pe, pa)
            summ[t][f"{name}_entropy_change"] = pe[-1] - pe[0]
            summ[t][f"{name}_accuracy_change"] = pa[-1] - pa[0]
    total_e = [sum(e.values()) for e in out["scan"]["entropy"]]
    avg_a = [float(np.mean(list(a.values()))) for a in out["scan"]["accuracy"]]
    out["summary"] = {"per_task": summ, "scan_argmin_summed_entropy": scan[int(np.argmin(total_e))],
                      "scan_argmax_mean_accuracy": scan[int(np.argmax(avg_a))],
                      "scan_spearman_summed": _spearman(total_e, avg_a)}
    return out
