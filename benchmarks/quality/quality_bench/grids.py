"""Hyperparameter grids for merging K task-specific fine-tunes with each method.

Small on purpose (each point costs one merge and one validation pass). Every point
gives each model weight 1; ``lambda`` scales the merged task vector. A method the
grids do not know gets a generic grid built from its declared parameters, so a new
registered method still lands in the benchmark table.
"""

from __future__ import annotations

import itertools
from typing import Any

from alloykit.methods.registry import MethodSpec

Point = tuple[dict[str, Any], dict[str, Any]]  # (shared parameters, per-model parameters)

LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # scales of a summed task vector (6 tasks: the optimum is near 1/K..0.3)
SUM_SCALES = [0.1, 0.2, 0.3, 0.5]  # for the sparsified sums
MEAN_SCALES = [0.7, 1.0, 1.5, 2.0]  # for disjoint means (one task vector's size)
WIDE_SCALES = [0.7, 1.0, 1.5, 2.0, 3.0, 4.0]  # isotropic / subspace merges (their optimum was at 2.0 or beyond)


def _product(shared: dict[str, list], per_model: dict[str, list]) -> list[Point]:
    keys_s, keys_m = list(shared), list(per_model)
    out = []
    for vs in itertools.product(*shared.values()):
        for vm in itertools.product(*per_model.values()):
            out.append((dict(zip(keys_s, vs)), dict(zip(keys_m, vm))))
    return out


# method -> (shared grid, per-model grid); 'weight': 1 is added where the method has one
KNOWN: dict[str, tuple[dict[str, list], dict[str, list]]] = {
    "linear": ({}, {}),  # the simple average (normalize on)
    "task_arithmetic": ({"lambda": list(LAMBDAS)}, {}),
    "ties": ({"lambda": [0.3, 0.5, 0.7, 1.0, 1.5]}, {"density": [0.2]}),  # disjoint mean (normalize on); 0.2 won before
    "ties_fusionbench": ({"lambda": SUM_SCALES}, {"density": [0.2]}),  # disjoint sum
    "ties_peft": ({}, {"density": [0.2], "weight": [1.0, 1.5, 2.0, 3.0]}),  # disjoint mean, scaled by the weight
    "dare_linear": ({"lambda": SUM_SCALES}, {"density": [0.5]}),
    "dare_ties": ({"lambda": SUM_SCALES}, {"density": [0.5]}),
    "della": ({"lambda": [0.3, 0.5, 0.7, 1.0, 1.5]}, {"density": [0.5]}),
    "della_linear": ({"lambda": SUM_SCALES}, {"density": [0.5]}),
    "breadcrumbs": ({"lambda": SUM_SCALES}, {"density": [0.8], "gamma": [0.01]}),
    "breadcrumbs_ties": ({"lambda": SUM_SCALES}, {"density": [0.8], "gamma": [0.01]}),
    "magnitude_prune": ({"lambda": SUM_SCALES}, {"density": [0.5]}),
    "sce": ({"select_topk": [0.1, 0.3, 1.0]}, {}),
    "karcher": ({}, {}),
    "model_stock": ({}, {}),
    "multislerp": ({}, {}),
    "nuslerp": ({}, {}),
    # subspace methods: their papers tune the global scale (alpha / lambda) on validation
    "iso_c": ({"alpha": WIDE_SCALES}, {}),
    "iso_cts": ({"alpha": WIDE_SCALES}, {}),
    "tsv_m": ({"alpha": WIDE_SCALES}, {}),
    "cart": ({"lambda": [1.0, 2.0, 3.0, 4.0, 6.0]}, {}),
    "consensus_ta": ({"alpha": [0.2, 0.3, 0.5, 0.7, 1.0]}, {}),
    "magmax": ({"lambda": [0.3, 0.5, 0.7, 1.0]}, {}),
    # data-dependent: statistics of each fine-tune on its task's training split (Bench.task_stats)
    "fisher": ({"normalize": [True, False]}, {}),
    "regmean": ({"alpha": [0.5, 0.9, 1.0]}, {}),
    "regmean_plus_plus": ({"alpha": [0.5, 0.9, 1.0]}, {}),
    # interference balancing: PCB's merge is a score-weighted mean (one task vector's size); its best
    # scale here sat at the low end of the mean scales, so the grid reaches down to 0.3. WUDI has no
    # scale to tune (the paper's point), only the solver
    "pcb": ({"density": [0.2], "lambda": [0.3, 0.5, 0.7, 1.0, 1.5]}, {}),
    "wudi": ({"solver": ["adam", "closed_form"]}, {}),  # closed_form: Tikhonov toward sum_i tau_i (issue 16)
    # tuning-free; the Bench scores each task on its own rebuilt model (unified + mask + rescaler)
    "emr": ({}, {}),
}


def applicable(spec: MethodSpec, k: int) -> str | None:
    """None if ``spec`` can merge k fine-tunes with the base, else why not."""
    if k < spec.min_models:
        return f"needs at least {spec.min_models} models"
    if spec.max_models is not None and k > spec.max_models:
        return f"merges at most {spec.max_models} model(s) besides the base"
    return None


def grid(spec: MethodSpec) -> list[Point]:
    fields = spec.param_fields()
    if spec.name in KNOWN:
        shared, per_model = KNOWN[spec.name]
        per_model = dict(per_model)
    else:  # generic: declared defaults, a lambda sweep if there is one
        shared, per_model = {}, {}
        for key, (scope, info) in fields.items():
            if info.is_required() and key != "weight":
                return []
        for scale in ("lambda", "alpha"):
            if scale in fields:
                shared = {scale: list(LAMBDAS)}
                break
    if "weight" in fields and "weight" not in per_model:
        per_model["weight"] = [1.0]
    return _product(shared, per_model)


def at_edge(points: list[Point], chosen: Point) -> list[str]:
    """Parameters the grid varies whose chosen value is the grid's smallest or largest (the optimum may lie beyond)."""
    out = []
    for scope in (0, 1):
        for key, value in chosen[scope].items():
            values = {p[scope][key] for p in points}
            if len(values) > 2 and value in (min(values), max(values)):
                out.append(key)
    return out


def describe(point: Point) -> str:
    shared, per_model = point
    items = {**shared, **{k: v for k, v in per_model.items()}}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "defaults"
