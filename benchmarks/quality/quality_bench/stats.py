"""Confidence intervals and resolved orderings from the per-example results of a track.

Every row records, per fine-tuning seed and task, which test examples it got right. A
two-level bootstrap resamples both sources of noise at once: the test examples of each
task (with replacement, the SAME resample for every row, so comparisons are paired) and,
for rows run on several seeds, the fine-tuning seeds (with replacement, the same draw for
every row with those seeds). Percentile intervals at 95%.

* accuracy: the mean over tasks of each task's accuracy (and over the row's seeds);
* normalized: merged / fine-tuned per task (the same seed's fine-tune), averaged;
* gain kept: (merged - probe) / (fine-tuned - probe) on the task averages: the fraction of
  what fine-tuning gained over a linear probe on the frozen base that the merge keeps (per
  task in the per-task table; a row's figure is the ratio of averages, because a task where
  fine-tuning gained nothing (mnist_sum: 0.1 points) makes a per-task ratio, and any mean
  of them, meaningless);
* a difference between two rows is *resolved* when its interval excludes 0 (computed on
  the seeds both rows ran on, paired by seed and by example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quality_bench.bench import unpack

FT, PROBE = "fine-tuned (individual)", "pretrained + linear probe"


@dataclass
class Interval:
    est: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return {"est": self.est, "lo": self.lo, "hi": self.hi}


def _ci(est: float, samples: np.ndarray) -> Interval:
    if np.isnan(samples).all():
        return Interval(float(est), float("nan"), float("nan"))
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])  # NaN: a resample where fine-tuned equals the probe
    return Interval(float(est), float(lo), float(hi))


class TrackStats:
    """Bootstrap statistics of one track's results (``results["rows"]``)."""

    def __init__(self, results: dict[str, Any], n_boot: int = 2000, seed: int = 0):
        self.results, self.B = results, n_boot
        self.tasks = list(results["tasks"])
        rng = np.random.default_rng(seed)
        self.correct: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        #: rows that do not depend on the fine-tuning seed (the probe, the joint model): paired with every seed
        self.seedless = {n for n, r in results["rows"].items() if r.get("seeded") is False}
        for name, row in results["rows"].items():
            per_seed = {int(s): r for s, r in row.get("seeds", {}).items() if r.get("status", "ok") == "ok" and "test" in r}
            if per_seed:
                self.correct[name] = {s: {t: unpack(r["test"][t]["bits"], r["test"][t]["n"]).numpy().astype(np.float32)
                                          for t in self.tasks} for s, r in per_seed.items()}
        n = {t: len(next(iter(next(iter(self.correct.values())).values()))[t]) for t in self.tasks} if self.correct else {}
        # one resample of each task's test examples per replicate, shared by every row: paired comparisons
        self.weights = {t: rng.multinomial(n[t], np.full(n[t], 1.0 / n[t]), size=n_boot).astype(np.float32) / n[t]
                        for t in self.tasks}
        self._seed_draws: dict[int, np.ndarray] = {}
        self._rng = rng
        self._cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def names(self) -> list[str]:
        return list(self.correct)

    def seeds(self, name: str) -> list[int]:
        return sorted(self.correct.get(name, {}))

    def supports(self, metric: str) -> bool:
        """Whether the rows ``metric`` is relative to ran: normalized needs the fine-tunes, gain kept also the probe."""
        needs = {"accuracy": (), "normalized": (FT,), "gain": (FT, PROBE)}[metric]
        return all(self.seeds(n) for n in needs)

    def _task_acc(self, name: str, seed: int) -> dict[str, np.ndarray]:
        """Per task: (point estimate, bootstrap replicates [B]) of the accuracy, packed as [B + 1] (index 0: estimate)."""
        key = (name, seed)
        if key not in self._cache:
            c = self.correct[name][seed]
            self._cache[key] = {t: np.concatenate([[c[t].mean()], self.weights[t] @ c[t]]) for t in self.tasks}
        return self._cache[key]

    def _draws(self, k: int) -> np.ndarray:
        """Seed indices [B, k], drawn with replacement, the same for every row with k seeds (index row 0: identity)."""
        if k not in self._seed_draws:
            d = self._rng.integers(0, k, size=(self.B, k))
            self._seed_draws[k] = np.vstack([np.arange(k)[None, :], d])
        return self._seed_draws[k]

    def _metric(self, name: str, seed: int, metric: str) -> np.ndarray:
        """[B + 1] of a per-seed metric averaged over tasks (estimate first)."""
        acc = self._task_acc(name, seed)
        if metric == "accuracy":
            per_task = [acc[t] for t in self.tasks]
        else:
            ft_seed = seed if seed in self.correct.get(FT, {}) else self.seeds(FT)[0]
            ft = self._task_acc(FT, ft_seed)
            if metric == "normalized":
                per_task = [acc[t] / np.maximum(ft[t], 1e-9) for t in self.tasks]
            else:  # gain kept: the ratio of the task averages
                probe = self._task_acc(PROBE, self.seeds(PROBE)[0])
                gained = np.mean([ft[t] - probe[t] for t in self.tasks], axis=0)
                kept = np.mean([acc[t] - probe[t] for t in self.tasks], axis=0)
                return kept / _nonzero(gained)
        return np.mean(per_task, axis=0)

    def _over_seeds(self, values: dict[int, np.ndarray]) -> np.ndarray:
        """Average over seeds, resampled: [B + 1] (estimate: the plain mean over the seeds)."""
        seeds = sorted(values)
        stack = np.stack([values[s] for s in seeds])  # [S, B + 1]
        if len(seeds) == 1:
            return stack[0]
        draws = self._draws(len(seeds))  # [B + 1, S]
        return stack[draws, np.arange(stack.shape[1])[:, None]].mean(1)

    def interval(self, name: str, metric: str = "accuracy", seeds: list[int] | None = None) -> Interval:
        seeds = seeds or self.seeds(name)
        v = self._over_seeds({s: self._metric(name, s, metric) for s in seeds})
        return _ci(v[0], v[1:])

    def per_task(self, name: str, task: str, metric: str = "accuracy") -> Interval:
        """One task's accuracy (or gain kept), averaged over the row's seeds, with its interval."""
        vals = {}
        for s in self.seeds(name):
            acc = self._task_acc(name, s)[task]
            if metric == "gain":
                ft = self._task_acc(FT, s if s in self.correct[FT] else self.seeds(FT)[0])[task]
                probe = self._task_acc(PROBE, self.seeds(PROBE)[0])[task]
                acc = (acc - probe) / _nonzero(ft - probe)
            vals[s] = acc
        v = self._over_seeds(vals)
        return _ci(v[0], v[1:])

    def seed_spread(self, name: str) -> list[float]:
        """The average accuracy of each seed (no resampling)."""
        return [float(self._metric(name, s, "accuracy")[0]) for s in self.seeds(name)]

    def _paired_seeds(self, a: str, b: str) -> list[tuple[int, int, int]]:
        """(seed key, seed of a, seed of b) to compare on: the seeds both ran; a seedless row pairs with every seed."""
        sa, sb = self.seeds(a), self.seeds(b)
        if a in self.seedless and sa:
            return [(s, sa[0], s) for s in sb]
        if b in self.seedless and sb:
            return [(s, s, sb[0]) for s in sa]
        return [(s, s, s) for s in sorted(set(sa) & set(sb))]

    def compare(self, a: str, b: str, metric: str = "accuracy") -> dict:
        """a - b on the seeds both ran, paired by seed and example; resolved when the interval excludes 0."""
        pairs = self._paired_seeds(a, b)
        common = [k for k, _, _ in pairs]
        if not common:
            return {"diff": None, "resolved": False, "seeds": []}
        v = self._over_seeds({k: self._metric(a, x, metric) - self._metric(b, y, metric) for k, x, y in pairs})
        ci = _ci(v[0], v[1:])
        return {"diff": ci.est, "lo": ci.lo, "hi": ci.hi, "resolved": bool(ci.lo > 0 or ci.hi < 0), "seeds": common}

    def ordering(self, names: list[str]) -> list[tuple[str, str, dict]]:
        """Rows sorted best first, and between neighbours '>' (resolved) or '~' (not resolved)."""
        ranked = sorted(names, key=lambda n: -self.interval(n).est)
        out = []
        for a, b in zip(ranked, ranked[1:]):
            c = self.compare(a, b)
            out.append((a, ">" if c["resolved"] and c["diff"] > 0 else "~", c))
        if ranked:
            out.append((ranked[-1], "", {}))
        return out


def _nonzero(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1e-9, np.nan, x)
