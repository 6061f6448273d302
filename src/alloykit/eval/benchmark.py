"""The multi-task merging benchmark: fine-tune -> merge -> evaluate -> results.

1. One fine-tune of the base encoder per task (fixed seeded recipe), cached on disk
   by a key over the recipe and the task's training split, so it runs once.
2. Baselines: each fine-tune on its own task; a jointly trained multi-task encoder;
   the pretrained encoder with linear probes; the pretrained encoder with the
   fine-tuned heads (what a merge with lambda 0 gives).
3. Every registered method merges the fine-tuned encoders (heads stay per task);
   its grid point is chosen on the validation splits, then scored once on test.
   Recipe searches (``search_methods``: AdaMerging, greedy and uniform soups, see
   :mod:`alloykit.search.bench`) search on the validation splits and add their rows.
4. Normalized accuracy (merged / fine-tuned, per task, averaged) against the number
   of tasks merged, 2..N, for a few methods at their chosen grid points.

Results are one JSON-serialisable dict (see :func:`run`), written by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alloykit.eval import grids
from alloykit.eval.evaluator import AccuracyEvaluator, TaskModel
from alloykit.eval.model import (FinetuneRecipe, base_model_path, embed, finetune, load_encoder, load_tokenizer,
                                 train_probe)
from alloykit.eval.tasks import Task, get_task

CURVE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "emr", "iso_cts", "regmean")


@dataclass
class BenchConfig:
    tasks: list[str]
    recipe: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    #: steps of the jointly trained model (round robin over the tasks)
    joint_steps: int = 750
    n_test: int = 1000
    n_val: int = 200
    n_train: int | None = None
    #: training examples per task for the linear probes on the frozen pretrained encoder
    n_probe: int = 2000
    #: None: every registered method
    methods: list[str] | None = None
    curve_methods: tuple[str, ...] = CURVE_METHODS
    cache_dir: str = ".bench/quality"
    threads: int = 1
    eval_batch: int = 128
    #: training examples per task for the statistics of data-dependent methods (fisher, regmean)
    n_stats: int = 256
    merge_seed: int = 0
    #: recipe searches run on the validation split (alloykit.search.bench.SEARCH_METHODS); none by default
    search_methods: list[str] = field(default_factory=list)
    #: AdaMerging: Adam steps, learning rate, unlabelled validation inputs per task
    search_steps: int = 100
    search_lr: float = 1e-3
    search_samples: int = 200

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


class Bench:
    def __init__(self, config: BenchConfig, log=print):
        self.cfg, self.log = config, log
        torch.set_num_threads(config.threads)
        self.tasks: list[Task] = [get_task(t) for t in config.tasks]
        self.base_path = base_model_path()
        tok = load_tokenizer(self.base_path)
        self.ev = AccuracyEvaluator(tok, max_len=config.recipe.max_len, seed=config.recipe.seed, n_test=config.n_test,
                                    n_val=config.n_val, n_train=config.n_train, batch_size=config.eval_batch)
        self.work = load_encoder(self.base_path)  # one module; state dicts are swapped in for each evaluation
        self.base_sd = {k: v.clone() for k, v in self.work.state_dict().items()}
        self.cache = Path(config.cache_dir)

    # -- fine-tunes (cached) -------------------------------------------------------------
    def _key(self, tasks: list[Task], steps: int) -> str:
        h = hashlib.sha256(json.dumps({"recipe": self.cfg.recipe.to_dict(), "steps": steps,
                                       "base": str(self.base_path.name), "v": 1}, sort_keys=True).encode())
        for t in tasks:
            tr = self.ev.splits(t).train
            h.update(t.name.encode())
            h.update(json.dumps([tr.texts, tr.labels, self.ev.splits(t).labels]).encode())
        return h.hexdigest()[:16]

    def _trained(self, tasks: list[Task], steps: int, folder: Path) -> tuple[dict, dict[str, torch.nn.Linear], dict]:
        """Encoder state dict and heads of a fine-tune on ``tasks``; trained once, then read from ``folder``."""
        if (folder / "meta.json").exists():
            meta = json.loads((folder / "meta.json").read_text())
            sd = load_file(folder / "encoder" / "model.safetensors")
            hw = load_file(folder / "heads.safetensors")
            heads = {}
            for t in tasks:
                w, b = hw[f"{t.name}.weight"], hw[f"{t.name}.bias"]
                heads[t.name] = torch.nn.Linear(w.shape[1], w.shape[0])
                heads[t.name].load_state_dict({"weight": w, "bias": b})
            meta["cached"], meta["folder"] = True, str(folder)
            return sd, heads, meta
        self.log(f"  fine-tuning on {', '.join(t.name for t in tasks)}: {steps} steps")
        self.work.load_state_dict(self.base_sd)
        train = {t.name: self.ev.encoded(t, "train") for t in tasks}
        n_classes = {t.name: len(self.ev.splits(t).labels) for t in tasks}
        t0 = time.monotonic()
        heads = finetune(self.work, train, n_classes, self.cfg.recipe, steps=steps, log=self.log)
        secs = time.monotonic() - t0
        sd = {k: v.detach().clone().contiguous() for k, v in self.work.state_dict().items()}
        tmp = folder.with_name(folder.name + ".tmp")
        (tmp / "encoder").mkdir(parents=True, exist_ok=True)
        save_file(sd, tmp / "encoder" / "model.safetensors")
        (tmp / "encoder" / "config.json").write_text((self.base_path / "config.json").read_text())
        save_file({f"{t}.{k}": v.detach().contiguous() for t, h in heads.items() for k, v in h.state_dict().items()},
                  tmp / "heads.safetensors")
        meta = {"tasks": [t.name for t in tasks], "steps": steps, "seconds": round(secs, 1),
                "s_per_step": round(secs / steps, 3), "recipe": self.cfg.recipe.to_dict(), "threads": torch.get_num_threads()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
        meta["cached"], meta["folder"] = False, str(folder)
        return sd, heads, meta

    def finetune_all(self) -> None:
        self.ft_sd, self.ft_heads, self.ft_meta = {}, {}, {}
        for t in self.tasks:
            key = self._key([t], self.cfg.recipe.steps)
            sd, heads, meta = self._trained([t], self.cfg.recipe.steps, self.cache / "finetunes" / f"{t.name}-{key}")
            self.ft_sd[t.name], self.ft_heads[t.name], self.ft_meta[t.name] = sd, heads[t.name], meta
            took = "cached" if meta["cached"] else f"{meta['seconds']}s"
            self.log(f"  fine-tune {t.name}: {took}")

    # -- evaluation ----------------------------------------------------------------------
    def score(self, sd: dict, heads: dict[str, torch.nn.Linear], tasks: list[Task], split: str) -> dict[str, dict]:
        self.work.load_state_dict(sd)
        model = TaskModel(self.work, heads)
        return {t.name: self.ev.evaluate(model, t, split) for t in tasks}

    def _norm(self, res: dict[str, dict], ft: dict[str, dict]) -> float:
        return sum(res[t]["accuracy"] / ft[t]["accuracy"] for t in res) / len(res)

    def baselines(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        ft = {t.name: self.score(self.ft_sd[t.name], {t.name: self.ft_heads[t.name]}, [t], "test")[t.name] for t in self.tasks}
        out["fine-tuned (individual)"] = {"test": ft}
        self.ft_test = ft
        out["pretrained + fine-tuned heads"] = {"test": self.score(self.base_sd, self.ft_heads, self.tasks, "test")}
        probes = {}
        self.work.load_state_dict(self.base_sd)
        for t in self.tasks:
            tr = self.ev.encoded(t, "train").head(self.cfg.n_probe)
            probes[t.name] = train_probe(embed(self.work, tr, self.cfg.eval_batch), tr.labels,
                                         len(self.ev.splits(t).labels), seed=self.cfg.recipe.seed)
        out["pretrained + linear probe"] = {"test": self.score(self.base_sd, probes, self.tasks, "test")}
        if self.cfg.joint_steps > 0:
            key = self._key(self.tasks, self.cfg.joint_steps)
            sd, heads, meta = self._trained(self.tasks, self.cfg.joint_steps, self.cache / "joint" / key)
            out["multi-task (joint training)"] = {"test": self.score(sd, heads, self.tasks, "test"), "train": meta}
        for row in out.values():
            row["avg"] = _avg(row["test"])
            row["norm_avg"] = self._norm(row["test"], ft)
        return out

    def search(self, name: str) -> dict[str, Any]:
        """A search method's row (AdaMerging, soups): searched on validation, merged by its recipe, scored on test."""
        from alloykit.search.bench import search_row

        return search_row(self, name)

    # -- merging -------------------------------------------------------------------------
    def merged(self, method: str, point: grids.Point, tasks: list[Task], side: dict | None = None) -> tuple[dict, float]:
        from alloykit.merge import merge_state_dicts
        from alloykit.methods.registry import get_method

        spec = get_method(method)
        shared, per_model = point
        if spec.stats_inputs == "merged":  # RegMean++: collected while merging, per task list and alpha
            stats = self.merged_stats(tasks, shared.get("alpha", 0.9))
        else:
            stats = [self.task_stats(t, spec.needs_stats) for t in tasks] if spec.needs_stats else None
        t0 = time.monotonic()
        sd = merge_state_dicts([self.ft_sd[t.name] for t in tasks], method,
                               base=None if spec.base == "ignored" else self.base_sd, parameters=shared or None,
                               model_parameters=[dict(per_model) for _ in tasks] if per_model else None,
                               seed=self.cfg.merge_seed, stats=stats, side_outputs=side)
        return sd, time.monotonic() - t0

    def task_stats(self, task: Task, kind: str):
        """Statistics ``kind`` of the fine-tune of ``task`` on its training split (the first
        ``n_stats`` examples); collected once, then read from the cache folder."""
        from alloykit.stats.collect import collect
        from alloykit.stats.store import META_FILE, open_stats, write_stats

        key = self._key([task], self.cfg.recipe.steps)
        folder = self.cache / "stats" / f"{task.name}-{key}-{kind}-{self.cfg.n_stats}"
        if not (folder / META_FILE).is_file():
            self.log(f"  collecting {kind} statistics of the {task.name} fine-tune on {self.cfg.n_stats} training examples")
            self.work.load_state_dict(self.ft_sd[task.name])
            target, examples = self._stats_target(task, self.work)
            tensors, meta = collect(target, examples, kind, log=lambda msg: None)
            meta.update({"model": f"benchmark fine-tune {task.name}-{key}", "data": f"train split of {task.name}"})
            write_stats(folder, tensors, meta)
        return open_stats(folder, task.name)

    def _stats_target(self, task: Task, encoder: torch.nn.Module):
        """The fine-tune's encoder and head as a statistics target, and its first ``n_stats`` training examples."""
        import copy

        from alloykit.stats.collect import Example, Target, score_encoder

        head = copy.deepcopy(self.ft_heads[task.name]).requires_grad_(False)
        data = self.ev.encoded(task, "train").head(self.cfg.n_stats)
        examples = [Example(data.ids[i, : int(data.lengths[i])], int(data.labels[i]), task.name) for i in range(len(data))]
        return Target(encoder, task.name, score_encoder, heads={task.name: head}), examples

    def merged_stats(self, tasks: list[Task], alpha: float):
        """RegMean++ statistics of the fine-tunes of ``tasks`` (Grams of the merged earlier layers),
        collected once per task list and alpha, then read from the cache folder."""
        from alloykit.stats.sequential import regmean_plus_plus
        from alloykit.stats.store import META_FILE, open_stats, write_stats

        # v2: the block merges made while collecting use RegMean's ridge on singular Grams
        key = hashlib.sha256(json.dumps({"finetunes": [self._key([t], self.cfg.recipe.steps) for t in tasks],
                                         "v": 2}).encode()).hexdigest()[:12]
        folders = [self.cache / "stats-merged" / f"{key}-a{alpha}-{self.cfg.n_stats}" / t.name for t in tasks]
        if not all((f / META_FILE).is_file() for f in folders):
            self.log(f"  collecting RegMean++ statistics of {len(tasks)} fine-tunes (alpha {alpha}) on {self.cfg.n_stats} examples each")
            import copy

            pairs = []
            for t in tasks:
                enc = copy.deepcopy(self.work)  # one encoder per fine-tune: RegMean++ runs them side by side
                enc.load_state_dict(self.ft_sd[t.name])
                pairs.append(self._stats_target(t, enc))
            _, grams, metas = regmean_plus_plus([p[0] for p in pairs], [p[1] for p in pairs], alpha=alpha,
                                                log=lambda msg: None)
            for t, f, g, meta in zip(tasks, folders, grams, metas):
                meta.update({"model": f"benchmark fine-tune {t.name}", "data": f"train split of {t.name}"})
                write_stats(f, {"gram": g}, meta)
        return [open_stats(f, t.name) for f, t in zip(folders, tasks)]

    def merged_scores(self, method: str, point: grids.Point, tasks: list[Task], split: str) -> tuple[dict[str, dict], float]:
        """Scores of a merge on ``tasks``. EMR is scored per task, each task on its own model
        rebuilt from the unified model, its mask and its rescaler (the paper's protocol)."""
        if method != "emr":
            sd, secs = self.merged(method, point, tasks)
            return self.score(sd, self.ft_heads, tasks, split), secs
        from alloykit.methods.emr import task_state_dict

        side: dict = {}
        sd, secs = self.merged(method, point, tasks, side)
        return {t.name: self.score(task_state_dict(sd, self.base_sd, side, i), {t.name: self.ft_heads[t.name]}, [t], split)[t.name]
                for i, t in enumerate(tasks)}, secs

    def method(self, name: str) -> dict[str, Any]:
        from alloykit.methods.registry import get_method

        spec = get_method(name)
        why = grids.applicable(spec, len(self.tasks))
        points = grids.grid(spec) if why is None else []
        if why is None and not points:
            why = "has a required parameter the benchmark grid does not cover"
        if why:
            return {"status": "n/a", "reason": why}
        tried = []
        for point in points:
            try:
                val, secs = self.merged_scores(name, point, self.tasks, "val")
            except Exception as err:  # noqa: BLE001 - a method that fails is reported, not fatal
                tried.append({"params": grids.describe(point), "error": f"{type(err).__name__}: {err}"})
                continue
            tried.append({"params": grids.describe(point), "point": point, "merge_s": round(secs, 2),
                          "val_avg": _avg(val), "val": {t: r["accuracy"] for t, r in val.items()}})
            self.log(f"    {name} [{grids.describe(point)}]: val {100 * _avg(val):.1f}  (merge {secs:.1f}s)")
        ok = [p for p in tried if "val_avg" in p]
        if not ok:
            return {"status": "error", "reason": tried[-1]["error"] if tried else "no grid point", "grid": tried}
        best = max(ok, key=lambda p: p["val_avg"])  # first of equals: grids list the plainest point first
        test, _ = self.merged_scores(name, best["point"], self.tasks, "test")
        for p in tried:
            p.pop("point", None)
        chosen = _point_of(best["params"], points)
        return {"status": "ok", "chosen": best["params"], "chosen_point": _jsonable(chosen),
                "at_grid_edge": grids.at_edge(points, chosen),
                "grid": tried, "test": test, "avg": _avg(test), "norm_avg": self._norm(test, self.ft_test)}

    def curve(self, methods: dict[str, dict]) -> dict[str, list[dict]]:
        """Normalized test accuracy when merging the first k tasks, k = 2..N (chosen points at N)."""
        from alloykit.methods.registry import get_method

        out: dict[str, list[dict]] = {}
        for name in self.cfg.curve_methods:
            row = methods.get(name)
            if not row or row.get("status") != "ok":
                continue
            point = _point_of(row["chosen"], grids.grid(get_method(name)))
            out[name] = []
            for k in range(2, len(self.tasks) + 1):
                sub = self.tasks[:k]
                res = row["test"] if k == len(self.tasks) else self.merged_scores(name, point, sub, "test")[0]
                out[name].append({"k": k, "tasks": [t.name for t in sub], "avg": _avg(res),
                                  "norm_avg": self._norm(res, self.ft_test)})
                self.log(f"    curve {name} k={k}: normalized {100 * out[name][-1]['norm_avg']:.1f}")
        return out


def _avg(res: dict[str, dict]) -> float:
    return sum(r["accuracy"] for r in res.values()) / len(res)


def _point_of(desc: str, points: list[grids.Point]) -> grids.Point:
    return next(p for p in points if grids.describe(p) == desc)


def _jsonable(point: grids.Point) -> dict:
    return {"parameters": point[0], "model_parameters": point[1]}


def run(config: BenchConfig, log=print, checkpoint: Path | None = None, bench: Bench | None = None) -> dict[str, Any]:
    """Run the whole benchmark; ``checkpoint`` (a JSON path) receives partial results as they come.

    Pass ``bench`` (a :class:`Bench` of the same config) to reuse it afterwards, e.g. in tests.
    """
    from alloykit.methods.registry import all_methods

    t_start = time.monotonic()
    results: dict[str, Any] = {"config": config.to_dict(), "timings": {}}

    def save() -> None:
        if checkpoint:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(results, indent=1))

    def phase(name: str, t0: float) -> None:
        results["timings"][name] = round(time.monotonic() - t0, 1)
        log(f"[{name}] {results['timings'][name]}s (total {time.monotonic() - t_start:.0f}s)")
        save()

    t0 = time.monotonic()
    bench = bench or Bench(config, log)
    results["hardware"] = hardware()  # after Bench set the torch threads
    results["tasks"] = {t.name: {"description": t.description, "source": t.source, "classes": len(bench.ev.splits(t).labels),
                                 "train": len(bench.ev.splits(t).train), "val": len(bench.ev.splits(t).val),
                                 "test": len(bench.ev.splits(t).test)} for t in bench.tasks}
    phase("data", t0)
    t0 = time.monotonic()
    bench.finetune_all()
    results["finetune"] = bench.ft_meta
    phase("finetune", t0)
    t0 = time.monotonic()
    results["baselines"] = bench.baselines()
    phase("baselines", t0)
    names = config.methods or list(all_methods())
    results["methods"] = {}
    t0 = time.monotonic()
    for i, name in enumerate(names):
        tm = time.monotonic()
        log(f"  method {i + 1}/{len(names)}: {name}")
        results["methods"][name] = bench.method(name)
        results["methods"][name]["seconds"] = round(time.monotonic() - tm, 1)
        save()
    phase("methods", t0)
    if config.search_methods:
        t0 = time.monotonic()
        for name in config.search_methods:
            tm = time.monotonic()
            log(f"  search {name}")
            results["methods"][name] = {**bench.search(name), "seconds": round(time.monotonic() - tm, 1)}
            save()
        phase("search", t0)
    t0 = time.monotonic()
    results["curve"] = bench.curve(results["methods"])
    phase("curve", t0)
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    return results
