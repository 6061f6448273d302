"""The causal-LM track's rows: reference models, merges of the full fine-tunes, merges of the LoRA
fine-tunes; each scored on the held-out test examples (cached per row), then the report.

Every merge goes through the ``alloykit`` CLI as a user would run it: ``alloykit merge`` with
the GGUF base as ``base_model``, ``alloykit stats collect`` for RegMean and Fisher,
``alloykit search adamerging`` for AdaMerging, ``alloykit merge-lora`` for adapter merges.
Methods with a global scale (lambda or alpha) pick it from a small grid by the mean
validation accuracy (the validation examples are disjoint from the test examples).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lm_tasks
from lm_score import as_lists, from_lists, load_model, score, summary
from lm_common import ROOT, alloykit, digest, log

SCORER = 2  # bump when the scoring changes: cached scores are keyed by it

#: method -> (recipe parameters, per-model parameters, name of the scale knob or None)
METHODS = {
    "linear": ({}, {"weight": 1.0}, None),
    "task_arithmetic": ({}, {"weight": 1.0}, "lambda"),
    "ties": ({"normalize": False}, {"weight": 1.0, "density": 0.3}, "lambda"),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.3}, "lambda"),
    "della": ({"normalize": False, "epsilon": 0.1}, {"weight": 1.0, "density": 0.3}, "lambda"),
    "breadcrumbs": ({}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, "lambda"),
    "model_stock": ({}, {}, None),
    "multislerp": ({}, {"weight": 1.0}, None),
    "tsv_m": ({}, {}, "alpha"),
    "iso_c": ({}, {}, "alpha"),
    "iso_cts": ({}, {}, "alpha"),
    "regmean": ({}, {}, None),
    "fisher": ({}, {"weight": 1.0}, None),
}
STATS_METHODS = {"regmean": "gram", "fisher": "fisher"}
KEEP = {"task_arithmetic"}  # merged folders kept after scoring (the report's generations and harness example use it)


def _yaml(recipe: dict) -> str:
    return json.dumps(recipe, indent=1)  # JSON is YAML; alloykit's guarded loader reads it


class NotCached(Exception):
    """A row whose scores are not cached, in a ``cached_only`` run (the report from what is there)."""


class Bench:
    def __init__(self, p: dict, preset: str, gguf: Path, base: Path, data: dict[str, Path], cache: Path, log=log):
        from transformers import AutoTokenizer

        self.p, self.preset, self.gguf, self.base, self.data, self.cache, self.log = p, preset, gguf, base, data, cache, log
        self.tok = AutoTokenizer.from_pretrained(str(base))
        # the first n_eval test examples are scored, the first n_select validation examples pick scales
        self.test = {t: lm_tasks.read(f, "test")[:p["n_eval"]] for t, f in data.items()}
        self.val = {t: lm_tasks.read(f, "val")[:p["n_select"]] for t, f in data.items()}
        (cache / "scores").mkdir(parents=True, exist_ok=True)
        (cache / "merges").mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict] = {}
        self.score_cost: dict[str, dict] = {}  # row -> CPU and wall seconds of its test scoring
        self.last_cost: dict = {}
        self.chosen: dict[str, float | None] = {}  # label -> the scale the validation grid chose
        self.cached_only = False  # True: a row that is not cached raises NotCached instead of being scored

    # -- scoring ---------------------------------------------------------------------------
    def scores(self, key: str, make, split: str = "test") -> dict[str, dict]:
        """Per-task per-example scores of the model ``make()`` returns (a folder, or (base, adapter)),
        cached under ``key``."""
        n = self.p["n_eval"] if split == "test" else self.p["n_select"]
        path = self.cache / "scores" / f"{split}-{digest(key, SCORER, n, self.p['score_bf16'])}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and not all(t in cached["tasks"] for t in self.data):
            cached = None  # scored on fewer skills (a run with another task list): score again, on all of them
        cached = cached if cached is not None else self._larger(key, split, n)
        if cached is not None:
            self.last_cost = cached["cost"]
            if not path.is_file():  # the cost of scoring the larger set this row was read from
                first = next(iter(cached["tasks"].values()))
                self.last_cost = {**cached["cost"], "examples": len(first["correct"]), "skills": len(cached["tasks"])}
            return {t: from_lists({k: v[:n] for k, v in cached["tasks"][t].items()}) for t in self.data}
        if self.cached_only:
            raise NotCached(key)
        made = make()
        folder, adapter = made if isinstance(made, tuple) else (made, None)
        t0, c0 = time.monotonic(), time.process_time()
        model = load_model(folder, adapter)
        rows = self.test if split == "test" else self.val
        per = {t: score(model, self.tok, r, max_len=96, bf16=self.p["score_bf16"]) for t, r in rows.items()}
        cost = {"wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        path.write_text(json.dumps({"key": key, "scorer": SCORER, "bf16": self.p["score_bf16"], "cost": cost,
                                    "tasks": {t: as_lists(v) for t, v in per.items()}}))
        self.last_cost = cost
        self.log(f"  scored {key} on {split}: " + ", ".join(f"{t} {summary(v)['acc']:.3f}" for t, v in per.items())
                 + f" ({cost['cpu_s']:.0f}s cpu)")
        return per

    def _larger(self, key: str, split: str, n: int) -> dict | None:
        """The same model's scores from a run with more examples (the first ``n`` of each task are the
        same examples) or more tasks, if one is cached. Files without ``scorer``/``bf16`` were all
        written by scorer 2 under bf16 (the full preset)."""
        for f in sorted((self.cache / "scores").glob(f"{split}-*.json")):
            c = json.loads(f.read_text())
            if (c.get("key") == key and c.get("scorer", 2) == SCORER and c.get("bf16", True) == self.p["score_bf16"]
                    and all(t in c["tasks"] and len(c["tasks"][t]["correct"]) >= n for t in self.data)):
                return c
        return None

    # -- merging -----------------------------------------------------------------------------
    def merge(self, name: str, recipe: dict | Path) -> Path:
        """``alloykit merge`` of a recipe (a dict, or a YAML file such as a search wrote)."""
        out = self.cache / "merges" / name
        cost = self.cache / "merges" / f"{name}.cost.json"
        if (out / "alloykit_recipe.yaml").is_file():
            if cost.is_file():
                self.timings[name] = json.loads(cost.read_text())
            return out
        path = recipe if isinstance(recipe, Path) else self.cache / "merges" / f"{name}.yml"
        if not isinstance(recipe, Path):
            path.write_text(_yaml(recipe))
        t0, c0 = time.monotonic(), _children_cpu()
        alloykit("merge", str(path), str(out), "--overwrite", "--quiet", "--threads", "1")
        self.timings[name] = {"wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(_children_cpu() - c0, 1)}
        cost.write_text(json.dumps(self.timings[name]))
        return out

    def recipe(self, method: str, models: list[str], scale: float | None, stats: dict[str, Path] | None = None) -> dict:
        shared, per_model, knob = METHODS[method]
        params = dict(shared)
        if knob and scale is not None:
            params[knob] = scale
        entries = []
        for m in models:
            e = {"model": m}
            if per_model:
                e["parameters"] = dict(per_model)
            if stats:
                e["stats"] = str(stats[m])
            entries.append(e)
        recipe = {"merge_method": method, "models": entries, "dtype": "float32", "seed": 0}
        if method not in ("linear", "regmean", "fisher"):
            recipe["base_model"] = str(self.gguf)
        if params:
            recipe["parameters"] = params
        return recipe

    def tuned(self, label: str, method: str, models: list[str], stats=None):
        """The merge with the scale chosen on validation (methods without a knob: one merge), as
        ``(make, scale, key)``: ``make()`` merges, called only when the test scores are not cached."""
        knob = METHODS[method][2]
        grid = self.p["grid"] if knob else [None]
        best = None
        for g in grid:
            name = f"{label}-{g}" if g is not None else label
            recipe = self.recipe(method, models, g, stats)
            key = f"{name}:{digest(recipe)}"
            if len(grid) > 1:
                val = self.scores(key, lambda: self.merge(name, recipe), split="val")
                acc = sum(summary(v)["acc"] for v in val.values()) / len(val)
                loss = sum(summary(v)["loss"] for v in val.values()) / len(val)
                if best is None or (acc, -loss) > best[0]:
                    best = ((acc, -loss), g, name, recipe)
            else:
                best = (None, g, name, recipe)
        _, g, name, recipe = best
        for other in grid:  # keep only the chosen merge on disk
            o = self.cache / "merges" / (f"{label}-{other}" if other is not None else label)
            if o.name != name and o.exists():
                shutil.rmtree(o)
        self.chosen[label] = g
        cost = self.cache / "merges" / f"{name}.cost.json"
        if cost.is_file():  # the merge's cost, for the report, when its scores are cached and it is not merged again
            self.timings[name] = json.loads(cost.read_text())
        return (lambda: self.merge(name, recipe)), g, f"{name}:{digest(recipe)}"


def run_rows(p: dict, preset: str, gguf: Path, base: Path, data: dict[str, Path], full: dict[str, Path],
             lora: dict[str, Path], multi: dict[str, Path], cache: Path, *, log=log, references: bool = True,
             cached_only: bool = False) -> dict:
    """``references=False``: only the merge rows (a second process scoring other methods beside a running one).
    ``cached_only``: only the rows whose scores are cached (nothing is trained, merged or scored)."""
    b = Bench(p, preset, gguf, base, data, cache, log)
    b.cached_only = cached_only
    rows: dict[str, dict] = {}

    def add(name: str, group: str, key: str, make, **info) -> None:
        try:
            per = b.scores(key, make)
        except NotCached:
            log(f"  {name}: not scored, left out (cached only)")
            return
        b.score_cost[name] = b.last_cost
        merged = b.cache / "merges" / key.split(":")[0]
        if group in ("merge", "search", "lora-merge") and name not in KEEP and merged.is_dir():
            shutil.rmtree(merged)  # 0.5 GB each; the scores are cached, a rerun merges again only if they change
        rows[name] = {"group": group, "tasks": {t: as_lists(v) for t, v in per.items()}, **info}

    log("reference rows")
    if references:
        add("base", "reference", f"base:{base.name}", lambda: base)
        for t, f in full.items():
            add(f"finetuned:{t}", "reference", f"ft:{f.name}", lambda f=f: f)
    if "multi" in multi and references:
        add("multi-task", "reference", f"multi:{multi['multi'].name}", lambda: multi["multi"])
    if len(full) < len(data):
        log(f"only {len(full)} of {len(data)} full fine-tunes are ready: no merge rows yet")
        return {"rows": rows, "merge_cost": b.timings, "score_cost": b.score_cost, "chosen": b.chosen}
    models = [str(full[t]) for t in data]
    methods = list(p["methods"] or METHODS)
    stats: dict = {}
    for method in methods:
        log(f"merge {method}")
        st = None
        if method in STATS_METHODS:
            try:  # on first need: the methods before it score first
                stats = stats or collect_stats(p, full, data, cache, cached_only=cached_only)
            except NotCached:
                log(f"  {method}: statistics not collected, left out (cached only)")
                continue
            st = {str(full[t]): stats[(t, STATS_METHODS[method])] for t in data}
        try:
            make, g, key = b.tuned(f"full-{method}", method, models, st)
        except NotCached:
            log(f"  {method}: validation not scored, left out (cached only)")
            continue
        add(method, "merge", key, make, scale=g, knob=METHODS[method][2])
    for gran in p["adamerging"]:
        log(f"adamerging ({gran})")
        recipe_path = adamerging(p, base, full, data, cache, gran, cached_only=cached_only)
        if recipe_path is None:
            log("  not searched, left out (cached only)")
            continue
        name = f"full-adamerging-{gran}"
        add(f"adamerging_{gran}", "search", f"{name}:{digest(recipe_path.read_text())}",
            lambda name=name, r=recipe_path: b.merge(name, r))
    if len(lora) == len(data):
        run_lora_rows(b, lora, data, add, log)
    shown = {"base": base, **({"multi-task": multi["multi"]} if "multi" in multi else {})}
    shown["task_arithmetic"] = b.cache / "merges" / f"full-task_arithmetic-{b.chosen.get('full-task_arithmetic')}"
    return {"rows": rows, "merge_cost": b.timings, "score_cost": b.score_cost, "chosen": b.chosen,
            "generations": generations(b, shown) if references and p.get("generations", True) else {}}


def run_lora_rows(b: Bench, lora: dict[str, Path], data, add, log) -> None:
    log("LoRA rows")
    for t, f in lora.items():
        add(f"lora:{t}", "lora-reference", f"lora:{f.name}", lambda f=f: (b.base, f))
    refs = [f"{b.gguf}+{lora[t]}" for t in data]  # base+adapter: the adapter folded into the GGUF base on read
    for method in b.p["lora_methods"]:
        try:
            make, g, key = b.tuned(f"lora-{method}", method, refs)
        except NotCached:
            continue
        add(f"lora {method}", "lora-merge", key, make, scale=g, knob=METHODS[method][2])
    for method in b.p["merge_lora"]:  # PEFT-format outputs; weights = the scale lora task_arithmetic chose
        out = b.cache / "merges" / f"lora-merge-lora-{method}"
        extra = ["--rank", str(b.p["lora_rank"]), "--density", "0.3"] if method == "ties" else []
        weights = [str(b.chosen.get("lora-task_arithmetic") or 1.0)] * len(lora)
        key = f"merge-lora:{method}:{digest([lora[t].name for t in data], weights, extra)}"

        def make(out=out, method=method, extra=extra, weights=weights):
            if not (out / "adapter_config.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                alloykit("merge-lora", *[str(lora[t]) for t in data], str(out), "--method", method, "--base", str(b.base),
                         "--weights", *weights, *extra)
            return (b.base, out)

        add(f"merge-lora {method}", "lora-merge", key, make, scale=float(weights[0]), knob="weights")


def generations(b: Bench, models: dict[str, Path], per_task: int = 2, new_tokens: int = 24) -> dict:
    """Greedy continuations of the first test prompts of each task by a few of the models (cached):
    what a merged model that read its base from a GGUF file writes."""
    import torch

    prompts = [r["prompt"] or r["target"] for t in b.test for r in b.test[t][:per_task]]
    key = digest({n: str(f) for n, f in models.items()}, prompts, new_tokens)
    path = b.cache / "scores" / f"generations-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = {"prompts": prompts, "outputs": {}}
    for name, folder in models.items():
        if not folder.exists():
            continue
        model = load_model(folder)
        texts = []
        for prompt in prompts:
            ids = b.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=b.tok.eos_token_id)
            texts.append(b.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        out["outputs"][name] = texts
    path.write_text(json.dumps(out))
    return out


def _children_cpu() -> float:
    import os

    t = os.times()
    return t.children_user + t.children_system


def collect_stats(p: dict, full: dict[str, Path], data: dict[str, Path], cache: Path, *, cached_only: bool = False) -> dict:
    out = {}
    for t, f in full.items():
        folder = cache / "stats" / f"{f.name}-{p['stats_samples']}"
        if not (folder / "done").is_file():
            if cached_only:
                raise NotCached(str(folder))
            log(f"stats collect {t} ({p['stats_samples']} training texts)")
            t0 = time.monotonic()
            alloykit("stats", "collect", str(f), "--data", str(data[t] / "train.txt"), "--kind", "all", "--samples",
                     str(p["stats_samples"]), "--max-len", str(p["max_len"]), "--out", str(folder))
            (folder / "done").write_text(f"{time.monotonic() - t0:.1f}\n")
        out[(t, "gram")] = folder
        out[(t, "fisher")] = folder
    return out


def adamerging(p: dict, base: Path, full: dict[str, Path], data: dict[str, Path], cache: Path, granularity: str, *,
               cached_only: bool = False) -> Path | None:
    key = digest([f.name for f in full.values()], granularity, p["ada_steps"], p["ada_samples"])
    out = cache / "search" / f"adamerging-{granularity}-{key}.yml"
    if not out.is_file():
        if cached_only:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        alloykit("search", "adamerging", "--base", str(base), "--models", *[str(full[t]) for t in data],
                 "--data", *[str(data[t] / "val.txt") for t in data], "--granularity", granularity,
                 "--steps", str(p["ada_steps"]), "--samples", str(p["ada_samples"]), "--batch-size", "4",
                 "--max-len", str(p["max_len"]), "--lr", "5e-3", "--quiet", "--out", str(out))
    return out


def results_path(preset: str) -> Path:
    return ROOT / "benchmarks" / "quality_lm" / f"results-{preset}.json"
