"""The rows of the benchmark table, declared in one place.

A row is a function ``run(bench, seed) -> dict`` that returns ``{"scores": {task: bool
tensor of the test examples it got right}, "chosen": "...", ...}`` (anything else it
returns is kept in the results JSON), or ``{"status": "n/a", "reason": "..."}``. It may
build any model it likes from the seed's fine-tunes (``bench.finetunes(seed)``): one merged
encoder, one model per task (EMR), a router over experts. Validation may be used for
choices; test never.

* every merge method in alloykit's registry is a row by its own name (its grid in
  :mod:`quality_bench.grids`, chosen on validation): nothing to add for a new method;
* baselines and searches are registered here with :func:`register_row`. A new row, e.g. a
  routing method::

      @register_row("wemoe", kind="routing", description="WEMoE, routers trained on test inputs")
      def wemoe(bench, seed):
          ft = bench.finetunes(seed)
          ...
          return {"scores": bench.score(...), "chosen": "..."}

  then ``benchmarks/quality/run.py --track text --update --rows wemoe`` adds it against the
  cached fine-tunes (see benchmarks/quality/README.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from alloykit.errors import did_you_mean
from alloykit.merge import merge_state_dicts
from alloykit.methods.registry import all_methods, get_method
from alloykit.search.adamerging import TaskVectorModel, adamerging
from alloykit.search.soups import greedy_soup
from quality_bench import grids
from quality_bench.bench import Bench, mean_accuracy

RowFn = Callable[[Bench, int], dict]


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "baseline", "method", "search", "routing", ...
    run: RowFn
    description: str = ""
    #: False: the row does not depend on the fine-tuning seed (runs once, on seed 0)
    seeded: bool = True


ROWS: dict[str, Row] = {}


def register_row(name: str, *, kind: str = "search", description: str = "", seeded: bool = True) -> Callable[[RowFn], RowFn]:
    def deco(fn: RowFn) -> RowFn:
        if name in ROWS:
            raise ValueError(f"row {name!r} registered twice")
        ROWS[name] = Row(name, kind, fn, description, seeded)
        return fn
    return deco


def get_row(name: str) -> Row:
    """A registered row, or the row of the registered merge method of that name."""
    if name in ROWS:
        return ROWS[name]
    if name in all_methods():
        return Row(name, "method", lambda bench, seed: method_row(bench, seed, name), get_method(name).fn.__doc__ or "")
    known = list(ROWS) + list(all_methods())
    raise SystemExit(f"unknown row '{name}'{did_you_mean(name, known)}; rows: {', '.join(known)}")


BASELINES = ["fine-tuned (individual)", "pretrained + linear probe", "pretrained + fine-tuned heads",
             "multi-task (joint training)"]


def method_names() -> list[str]:
    return list(all_methods())


# -- baselines ---------------------------------------------------------------------------------
@register_row("fine-tuned (individual)", kind="baseline", description="each task's fine-tune on its own task")
def _finetuned(bench: Bench, seed: int) -> dict:
    ft = bench.finetunes(seed)
    return {"scores": {t: bench.track.correct(ft.sd[t], ft.heads, t, "test") for t in bench.tasks}}


@register_row("pretrained + fine-tuned heads", kind="baseline", description="the base encoder with the fine-tuned heads")
def _base_heads(bench: Bench, seed: int) -> dict:
    return {"scores": bench.score(None, bench.finetunes(seed).heads, bench.tasks, "test")}


@register_row("pretrained + linear probe", kind="baseline", seeded=False,
              description="heads trained on the frozen base encoder's features")
def _probe(bench: Bench, seed: int) -> dict:
    return {"scores": bench.score(None, bench.probes(), bench.tasks, "test")}


@register_row("multi-task (joint training)", kind="baseline", seeded=False,
              description="one encoder trained on all tasks, round robin")
def _joint(bench: Bench, seed: int) -> dict:
    if bench.track.cfg.joint_steps <= 0:
        return {"status": "n/a", "reason": "joint_steps is 0 in this preset"}
    sd, heads, meta = bench.joint()
    return {"scores": bench.score(sd, heads, bench.tasks, "test"), "train": meta}


# -- merge methods -------------------------------------------------------------------------------
def method_row(bench: Bench, seed: int, name: str, points: list | None = None) -> dict:
    """A registered method: each grid point scored on validation, the best scored once on test.
    ``points``: this grid instead of the method's own (a budget-matched row)."""
    spec = get_method(name)
    why = grids.applicable(spec, len(bench.tasks))
    if why is None:
        points = points if points is not None else grids.grid(spec)
    else:
        points = []
    if why is None and not points:
        why = "has a required parameter the benchmark grid does not cover"
    if why:
        return {"status": "n/a", "reason": why}
    tried, best, best_merge = [], None, None
    for point in points if len(points) > 1 else []:  # one point: nothing to choose, no validation pass
        try:
            val, merged = bench.merged_scores(name, point, seed, bench.tasks, "val")
        except Exception as err:  # noqa: BLE001 - a grid point that fails is reported, not fatal
            tried.append({"params": grids.describe(point), "error": f"{type(err).__name__}: {err}"})
            continue
        tried.append({"params": grids.describe(point), "val_avg": mean_accuracy(val),
                      "val": {t: float(c.float().mean()) for t, c in val.items()}})
        bench.log(f"    {name} seed {seed} [{grids.describe(point)}]: val {100 * tried[-1]['val_avg']:.1f}")
        if best is None or tried[-1]["val_avg"] > best[1]:  # first of equals: grids list the plainest point first
            best, best_merge = (point, tried[-1]["val_avg"]), merged  # kept, so test does not merge again
    if len(points) > 1 and best is None:
        return {"status": "error", "reason": tried[-1]["error"], "grid": tried}
    chosen = best[0] if best else points[0]
    try:
        scores, _ = bench.merged_scores(name, chosen, seed, bench.tasks, "test", merged=best_merge)
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "reason": f"{type(err).__name__}: {err}", "grid": tried}
    return {"scores": scores, "chosen": grids.describe(chosen), "chosen_point": {"parameters": chosen[0],
            "model_parameters": chosen[1]}, "at_grid_edge": grids.at_edge(points, chosen), "grid": tried}


# -- searches ------------------------------------------------------------------------------------
class RecordingTaskVectorModel(TaskVectorModel):
    """Keeps the coefficients of every call (the AdaMerging study reads the path the search took)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[torch.Tensor] = []

    def params(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(coefficients.detach().clone())
        return super().params(coefficients)

    def path(self, steps: int) -> list[torch.Tensor]:
        """Coefficients after 0, 1, ..., steps updates (call 0 is the initial entropy, call s + 1 step s)."""
        return [self.calls[j + 1] for j in range(steps + 1)]


def moved_parameters(module: torch.nn.Module, finetuned: list[dict]) -> dict[str, torch.Tensor]:
    """The module's parameters that some fine-tune changed. Frozen ones (the text track's word
    embeddings) have zero task vectors: left out of the search, they keep the base's values in the
    functional model and get weight 0 in the recipe, the same merge at half the cost per step."""
    return {n: p.detach() for n, p in module.named_parameters() if any(not torch.equal(sd[n], p) for sd in finetuned)}


def run_adamerging(bench: Bench, seed: int, granularity: str) -> tuple[dict, Any, RecordingTaskVectorModel]:
    """AdaMerging as published on the seed's fine-tunes; the merged encoder (through the recipe
    ``alloykit search`` would write), the search result and the recorded coefficient path."""
    tr, cfg, ft = bench.track, bench.search, bench.finetunes(seed)
    module = copy.deepcopy(tr.module)
    module.load_state_dict(tr.base_sd)
    module.requires_grad_(False)
    tv = RecordingTaskVectorModel(moved_parameters(module, [ft.sd[t] for t in bench.tasks]),
                                  [ft.sd[t].__getitem__ for t in bench.tasks])
    objective = tr.entropy_objective(module, {t: copy.deepcopy(ft.heads[t]) for t in bench.tasks}, cfg.split, None)
    res = adamerging(tv, objective, granularity=granularity, steps=cfg.steps, lr=cfg.lr, init=cfg.init, clamp=(0.0, 1.0),
                     batch_size=cfg.batch_size, seed=bench.merge_seed,
                     log=lambda msg: bench.log(f"    adamerging {granularity} seed {seed}:{msg}"))
    sd = merge_state_dicts([ft.sd[t] for t in bench.tasks], "task_arithmetic", base=tr.base_sd,
                           parameters={"lambda": 1.0, "normalize": False},
                           model_parameters=[{"weight": res.model_weight(k)} for k in range(len(bench.tasks))])
    return sd, res, tv


def _adamerging_row(granularity: str) -> RowFn:
    def run(bench: Bench, seed: int) -> dict:
        sd, res, tv = run_adamerging(bench, seed, granularity)
        lam = res.coefficients
        if granularity == "task":
            chosen = "lambda " + ", ".join(f"{float(v):.2f}" for v in lam[:, 0])
        else:
            chosen = f"{lam.shape[1]} lambdas per model, mean " + ", ".join(f"{float(v):.2f}" for v in lam.mean(1))
        cfg = bench.search
        every = max(1, cfg.record_every)
        path = tv.path(cfg.steps)
        return {"scores": bench.score(sd, bench.finetunes(seed).heads, bench.tasks, "test"),
                "chosen": f"{chosen} ({cfg.steps} steps)",
                "search": {"granularity": granularity, "steps": cfg.steps, "lr": cfg.lr, "init": cfg.init, "clamp": [0.0, 1.0],
                           "batch_size": cfg.batch_size, "inputs": f"{cfg.split} split, unlabelled",
                           "entropy_init": res.entropy_init, "entropy_final": res.entropy_final,
                           "per_task_entropy_final": res.per_task_final,
                           "history": [round(h, 5) for h in res.history],
                           "coefficient_mean": lam.mean(1).tolist(), "coefficient_min": lam.min(1).values.tolist(),
                           "coefficient_max": lam.max(1).values.tolist(),
                           "path_steps": list(range(0, cfg.steps + 1, every)),
                           "path": [[[round(float(v), 5) for v in row] for row in path[j]] for j in range(0, cfg.steps + 1, every)]}}
    return run


register_row("adamerging_task", description="AdaMerging, one coefficient per model")(_adamerging_row("task"))
register_row("adamerging_layer", description="AdaMerging, one coefficient per model and tensor")(_adamerging_row("layer"))


def _soup(bench: Bench, seed: int, greedy: bool) -> dict:
    ft = bench.finetunes(seed)
    sds = [ft.sd[t] for t in bench.tasks]

    def average(chosen: list[int]) -> dict:
        picked = [sds[i] for i in chosen]
        return picked[0] if len(picked) == 1 else merge_state_dicts(picked, "linear", model_parameters=[{"weight": 1.0}] * len(picked))

    if greedy:
        res = greedy_soup(len(sds), lambda chosen: mean_accuracy(bench.score(average(chosen), ft.heads, bench.tasks, "val")))
        chosen = res.chosen
        extra = {"individual_val": dict(zip(bench.tasks, res.individual)), "trace": res.trace}
        label = f"{len(chosen)} of {len(sds)}: " + ", ".join(bench.tasks[i] for i in chosen)
    else:
        chosen, extra, label = list(range(len(sds))), {}, "all models"
    extra["ingredients"] = [bench.tasks[i] for i in chosen]
    return {"scores": bench.score(average(chosen), ft.heads, bench.tasks, "test"), "chosen": label, "search": extra}


register_row("greedy_soup", description="greedy soup on validation accuracy")(lambda bench, seed: _soup(bench, seed, True))
register_row("uniform_soup", description="the uniform average of every fine-tune")(lambda bench, seed: _soup(bench, seed, False))
SEARCH_ROWS = ["adamerging_task", "adamerging_layer", "greedy_soup", "uniform_soup"]

#: task arithmetic given the evolve row's budget: its one coefficient on a 64-point grid (0.02 to 1.28)
#: chosen on validation, so that "evolve beats task arithmetic" is measured at the same number of evaluations
TA_BUDGET = 64
register_row("task_arithmetic_64", description=f"task arithmetic, lambda chosen on validation among {TA_BUDGET} values "
             "(0.02 to 1.28): the evolve row's budget")(
    lambda bench, seed: method_row(bench, seed, "task_arithmetic",
                                   [({"lambda": round(0.02 * i, 2)}, {"weight": 1.0}) for i in range(1, TA_BUDGET + 1)]))

# routing rows (alloykit.moe: SMILE, WEMoE) register themselves on import
from quality_bench import routing  # noqa: E402,F401
from quality_bench import evolve_row  # noqa: E402,F401  (registers the "evolve" row: alloykit search evolve's CMA-ES)
