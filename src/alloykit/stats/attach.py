"""Plan-time: attach each model's statistics to the tensor jobs of a data-dependent method.

A planning step (``alloykit.plan.steps``): ``attach_stats_step`` runs on every plan of a
method with ``needs_stats``, through the planner's public ``PlanBuilder``; the package's
composition root (``alloykit/__init__.py``) registers it.

Every input model of such a recipe names its statistics folder (``stats:`` on its
``models:`` entry). For each job the planner adds, per input, the statistics tensor
aligned with the model's tensor: for ``fisher`` the tensor of the same name and shape,
for ``gram`` the tensor of the weight's name with shape [in, in]. The executor reads
them lazily like model tensors. Missing or mismatched statistics fail here, before a
tensor is read, with one line and the command that makes them.
"""

from __future__ import annotations

from pathlib import Path

from alloykit.errors import PlanError, RecipeError
from alloykit.methods.registry import MethodSpec
from alloykit.plan.planner import PlanBuilder, Source
from alloykit.stats.store import KIND_FILES, Stats, memory_stats, open_stats


def collect_command(model: str, kind: str, calibration: str | None = None, out: str | None = None) -> str:
    """The ``alloykit stats collect`` command that writes the statistics ``kind`` of ``model``."""
    model = model.rstrip("/") or model
    if calibration:
        data = f"--data {calibration}" if Path(calibration).suffix in (".txt", ".jsonl") else f"--task {calibration}"
    elif any((p / "heads.safetensors").is_file() for p in (Path(model), Path(model).parent)):
        data = "--task TASK"
    else:
        data = "--data CALIBRATION.txt"
    return f"alloykit stats collect {model} --out {out or model + '.stats'} --kind {kind} {data}"


_FROM = {"own": "each model's own layers", "merged": "the merged earlier layers (RegMean++)"}
_FIX = {"own": "merge them with method regmean_plus_plus, or collect them with 'alloykit stats collect'",
        "merged": "collect them with 'alloykit stats collect-merged', or merge with method regmean"}


def _missing(spec: MethodSpec, label: str, calibration: str | None, labels: list[str]) -> RecipeError:
    kind = spec.needs_stats
    cmd = collect_command(label, kind, calibration)
    if spec.stats_inputs == "merged":  # RegMean++: every model's statistics at once
        data = cmd.split(f" --kind {kind} ", 1)[1]
        cmd = (f"alloykit stats collect-merged {' '.join(m.rstrip('/') for m in labels)} "
               f"--out {' '.join(m.rstrip('/') + '.stats' for m in labels)} {data}")
    return RecipeError(f"method {spec.name} reads {kind} statistics and model '{label}' names none: run "
                       f"'{cmd}', then add 'stats: {label.rstrip('/')}.stats' to its entry in 'models'")


def attach_stats_step(b: PlanBuilder) -> None:
    """The planning step: statistics on every merged job of ``b``, and their norms in ``b.stats_norms``."""
    b.stats_norms = attach_stats(b)


def attach_stats(b: PlanBuilder) -> list[float] | None:
    """Set ``job.stats`` on every merged job of builder ``b``; returns the per-input norms (or None)."""
    spec, kind = b.spec, b.spec.needs_stats
    entries = {m.model: m for m in b.recipe.models or []}
    jobs = b.merged_jobs()
    inputs = [s.model for s in jobs[0].sources]
    stat_idx: list[int] = []
    norms: list[float | None] = []
    for i in inputs:
        label = b.labels[i]
        entry = entries.get(label)
        if entry is None or entry.stats is None:
            raise _missing(spec, label, entry.calibration if entry else None, [b.labels[j] for j in inputs])
        stats = b.preloaded_stats.get(entry.stats)
        if stats is not None and not isinstance(stats, Stats):  # merge_state_dicts: kind -> {tensor name: tensor}
            stats = memory_stats(entry.stats, dict(stats))
        if stats is None:
            stats = open_stats(b.resolve_path(entry.stats), label, collect_command(label, kind, entry.calibration, entry.stats))
        if kind not in stats.checkpoints:
            held = ", ".join(stats.kinds) or "no statistics"
            raise RecipeError(f"statistics '{stats.label}' of model '{label}' hold {held}, not the {kind} statistics "
                              f"method {spec.name} reads (no {KIND_FILES[kind]}): run "
                              f"'{collect_command(label, kind, entry.calibration)}'")
        inputs_from = (stats.meta.get(kind) or {}).get("inputs", "own")
        if spec.stats_inputs and inputs_from != spec.stats_inputs:
            raise RecipeError(f"statistics '{stats.label}' of model '{label}' are Grams of inputs from {_FROM[inputs_from]}; "
                              f"method {spec.name} reads Grams of inputs from {_FROM[spec.stats_inputs]}: "
                              f"{_FIX[spec.stats_inputs]}")
        stat_idx.append(b.add_checkpoint(f"{stats.label} [{kind}]", stats.checkpoints[kind]))
        norms.append(stats.norm(kind))
    for job in jobs:
        want = tuple(job.shape) if kind == "fisher" else ((job.shape[1], job.shape[1]) if len(job.shape) == 2 else None)
        if want is None:
            continue
        names = [s.tensor for s in job.sources]
        have = [n in b.checkpoint(k) for n, k in zip(names, stat_idx)]
        if not any(have):
            continue  # a buffer, or no linear layer's weight: the method averages it
        for n, k, ok, i in zip(names, stat_idx, have, inputs):
            ck = b.checkpoint(k)
            if not ok:
                other = b.checkpoint(stat_idx[have.index(True)]).label
                raise PlanError(f"statistics '{ck.label}' of model '{b.labels[i]}' have no entry for tensor '{n}' "
                                f"but '{other}' have: collect both models' statistics the same way")
            shape = tuple(ck.info(n).shape)
            if shape != want:
                raise PlanError(f"statistics '{ck.label}': {kind} of tensor '{n}' has shape {list(shape)}, expected "
                                f"{list(want)} for the model's {list(job.shape)}; were they collected on model "
                                f"'{b.labels[i]}'?")
        job.stats = [Source(k, n) for n, k in zip(names, stat_idx)]
    return None if any(n is None for n in norms) else [float(n) for n in norms]
