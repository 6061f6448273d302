"""``alloykit search evolve``: CMA-ES over merge recipes, candidates merged in memory and scored
on alloykit's evaluation tasks or lm-evaluation-harness tasks, serially or on Ray actors.

The search (after mergekit-evolve, which runs CMA-ES with lm-eval fitness on Ray): CMA-ES
(PyPI ``cmaes``, seeded) proposes a generation of vectors in the unit cube; each decodes to a
recipe (``alloykit.distributed.genome``); a worker plans that recipe with the models
preloaded in memory, merges it through the ordinary executor into a state dict (no
checkpoint is written), and scores it (``evolve_fitness``): with a ``TaskSuite``, the mean
validation metric over the tasks (the validation split only; test stays unseen), or through
``alloykit eval --lm-eval``'s harness code on the merged causal LM (``lm_eval:``). Workers are Ray actors that load
the base, the fine-tunes and the task data once and keep them (``--workers N``), or one
in-process worker when Ray is absent or ``--workers 1``; every worker computes with one
thread, so a candidate's score does not depend on which worker scored it.

After every generation the state (every evaluation: its vector and its score) is written
durably beside the output; ``--resume`` rebuilds CMA-ES by replaying the recorded
generations (the seeded sampler proposes the same vectors, which is checked) and continues.
Outputs: the best recipe (an ordinary recipe; ``alloykit merge`` of it gives the model the
search scored, bit for bit), a CSV of every evaluation and a plot of fitness against
evaluations.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from alloykit.config import explain, load_yaml
from alloykit.distributed.cluster import LOCAL, PIP_RAY, RayMissing, connect
from alloykit.distributed.evolve_fitness import EvolveError, Fitness, fitness_class, merge_in_memory
from alloykit.distributed.genome import EvolveConfig, Genome
from alloykit.errors import AlloyError
from alloykit.io.durable import write_text_durably
from alloykit.output.faults import fault_point
from alloykit.progress import Progress
from alloykit.roles import num_layers
from alloykit.search import inputs
from alloykit.search.run import recipe_text

_log = logging.getLogger(__name__)

__all__ = ["EvolveError", "EvolveResult", "Fitness", "cma_search", "evolve", "load_config", "merge_in_memory"]

PIP_CMAES = "pip install 'alloykit[evolve]'  (or: pip install cmaes)"


def load_config(path: str | os.PathLike) -> tuple[EvolveConfig, str]:
    """The checked config, with relative paths (models, task files) made absolute from its folder;
    and its text (whose digest ties a saved state to it)."""
    p = Path(path)
    raw = load_yaml(p, what="evolve config", error=EvolveError)
    if not isinstance(raw, dict):
        raise EvolveError(f"evolve config '{path}': expected a mapping (base_model, models, tasks, ...)")
    try:
        config = EvolveConfig.model_validate(raw)
    except ValidationError as err:
        raise EvolveError(explain(err, EvolveConfig).line(f"evolve config '{path}'")) from None

    def here(ref: str) -> str:
        q = Path(ref).expanduser()
        return str((p.parent / q).resolve()) if not q.is_absolute() and (p.parent / q).exists() else ref

    base = here(config.base_model) if config.base_model is not None else None
    update = {"base_model": base, "models": [here(m) for m in config.models], "tasks": [here(t) for t in config.tasks]}
    if config.lm_eval is not None:
        update["lm_eval"] = config.lm_eval.model_copy(update={"include_path": [here(d) for d in config.lm_eval.include_path]})
    config = config.model_copy(update=update)
    if config.lm_eval is not None:
        _check_harness_tasks(config, path)
    return config, p.read_text(encoding="utf-8")


def _check_harness_tasks(config: EvolveConfig, path) -> None:
    """Before any model loads: the harness is installed and knows every task (one line otherwise)."""
    from alloykit.eval import lm_harness

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvolveError(f"evolve config '{path}': lm_eval fitness needs lm-evaluation-harness, which is not "
                          f"installed: {lm_harness.INSTALL}") from None
    try:
        lm_harness.task_manager([t for t, _ in config.lm_eval.task_metrics()], config.lm_eval.include_path,
                                what="lm_eval task", include_what="lm_eval include_path")
    except AlloyError as err:
        raise EvolveError(f"evolve config '{path}': {err}") from None


def _import_cmaes():
    try:
        import cmaes
    except ImportError:
        raise EvolveError(f"search evolve needs the cmaes package, which is not installed: {PIP_CMAES}") from None
    return cmaes


class _Workers:
    """Scores a list of recipe bodies, in order: on Ray actors, or in this process."""

    def __init__(self, config: EvolveConfig, workers: int, ray_address: str | None):
        self.n, self.ray, self.actors, self.pool, self.local = workers, None, [], None, None
        if workers > 1 or ray_address is not None:
            try:
                self.ray = connect(ray_address or LOCAL, num_cpus=workers if ray_address in (None, LOCAL) else None)
            except RayMissing:
                if ray_address is not None:
                    raise
                _log.warning(f"ray is not installed, so the {workers} workers become one, in this process ({PIP_RAY})")
        if self.ray is not None:
            from ray.util import ActorPool

            actor = self.ray.remote(num_cpus=1)(fitness_class(config))
            data = config.model_dump()
            self.actors = [actor.remote(data) for _ in range(max(workers, 1))]  # each loads the models once
            self.pool = ActorPool(self.actors)
        else:
            self.local, self.n = fitness_class(config)(config), 1

    def __call__(self, bodies: list[dict]) -> list[dict]:
        if self.pool is None:
            return [self.local.evaluate(b) for b in bodies]
        try:
            return list(self.pool.map(lambda a, b: a.evaluate.remote(b), bodies))
        except self.ray.exceptions.RayError as err:  # a worker's one-line error (a bad metric) as the serial run gives it
            cause = getattr(err, "cause", None)
            if isinstance(cause, AlloyError):
                raise cause from None
            raise

    def records(self) -> list[str]:
        return self.local.records() if self.local is not None else self.ray.get(self.actors[0].records.remote())

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self.pool = [], None


@dataclass
class EvolveResult:
    best: dict  # the best evaluation's record
    evaluations: list[dict]
    recipe: str
    paths: dict[str, Path]
    body: dict


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    stem = out.with_suffix("")
    return {"recipe": out, "csv": Path(f"{stem}.evaluations.csv"), "plot": Path(f"{stem}.fitness.png"),
            "state": Path(f"{stem}.evolve-state.json")}


def cma_search(genome: Genome, score: Callable[[list[dict]], list[dict]], body_of: Callable[[Any], dict], *,
               max_evals: int, population: int, sigma: float, seed: int, evaluations: list[dict] | None = None,
               after_generation: Callable[[list[dict]], None] | None = None,
               progress: Progress | None = None) -> list[dict]:
    """CMA-ES (seeded) over ``genome``'s unit cube until ``max_evals`` evaluations: each generation's
    vectors become recipe bodies (``body_of``), ``score(bodies)`` returns one result per body (a dict
    with ``score``, higher is better), in order. ``evaluations``: those of an interrupted run, replayed
    (the sampler must propose the same vectors); ``after_generation(evaluations)`` saves the state.
    Returns every evaluation: its number, generation, vector, method, normalize and result."""
    cmaes = _import_cmaes()
    import numpy as np

    evaluations = list(evaluations or [])
    cma = cmaes.CMA(mean=np.full(genome.dim, 0.5), sigma=sigma, bounds=np.array([[0.0, 1.0]] * genome.dim),
                    seed=seed, population_size=population)
    done_generations = len(evaluations) // population
    for g in range(done_generations):  # replay: the seeded sampler proposes the recorded vectors again
        recorded = evaluations[g * population:(g + 1) * population]
        xs = [cma.ask() for _ in range(population)]
        if not all(np.allclose(x, r["x"], rtol=0, atol=1e-12) for x, r in zip(xs, recorded)):
            raise EvolveError("cannot resume: CMA-ES proposes other candidates than it recorded (another cmaes "
                              "version?); delete the state file to start over")
        cma.tell([(x, -r["score"]) for x, r in zip(xs, recorded)])
    del evaluations[done_generations * population:]  # a partly recorded last generation is redone
    if progress is not None:
        progress.update(len(evaluations))
    while len(evaluations) < max_evals:
        generation = len(evaluations) // population
        xs = [cma.ask() for _ in range(population)][:max_evals - len(evaluations)]
        results = score([body_of(x) for x in xs])
        for x, r in zip(xs, results):
            cand = genome.decode(x)
            evaluations.append({"eval": len(evaluations), "generation": generation, "x": [float(v) for v in x],
                                "method": cand.method, "normalize": cand.normalize, **r})
        if len(xs) == population:  # a last, partial generation ends the search: nothing to tell
            cma.tell([(x, -r["score"]) for x, r in zip(xs, results)])
        if after_generation is not None:
            after_generation(evaluations)
        if progress is not None:
            best = max(evaluations, key=lambda e: e["score"])
            progress.what = f"evolve (best {best['score']:.4f}, generation {generation})"
            progress.update(len(xs))
    return evaluations


def evolve(config_path: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1, ray_address: str | None = None,
           resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> EvolveResult:
    """CMA-ES over recipes of ``config_path``'s models; writes the best recipe to ``out`` and, beside
    it, ``*.evaluations.csv``, ``*.fitness.png`` and the search state ``*.evolve-state.json``."""
    _import_cmaes()
    config, text = load_config(config_path)
    paths = output_paths(out)
    if not paths["recipe"].parent.is_dir():
        raise EvolveError(f"--out '{out}': folder '{paths['recipe'].parent}' does not exist")
    genome = Genome(config)
    base_folder, folders, base_ck, _ = inputs.checked_pair(config.base_model, config.models, config.model_class)
    names = list(base_ck.tensors)
    n_layers = num_layers(base_ck.config(), names)
    base_ref = str(base_folder.path) if config.base_model is not None else None
    refs = [str(f.path) for f in folders]
    population = config.population or 4 + int(3 * math.log(genome.dim))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    previous = _load_state(paths["state"], key, resume)
    if previous:
        _log.info(f"resuming: {len(previous) // population * population} evaluations already done")

    def body_of(x) -> dict:
        return genome.recipe(genome.decode(x), base_ref, refs, names, n_layers)

    def saved(evaluations: list[dict]) -> None:
        _save_state(paths["state"], key, config, population, evaluations)
        write_csv(paths["csv"], evaluations)
        fault_point("evolve-generation-saved")

    pool = _Workers(config, workers, ray_address)
    try:
        evaluations = cma_search(genome, pool, body_of, max_evals=config.max_evals, population=population,
                                 sigma=config.sigma, seed=config.seed, evaluations=previous, after_generation=saved,
                                 progress=Progress("evolve", config.max_evals, log, unit="evaluations", enabled=progress))
        best = max(evaluations, key=lambda e: e["score"])  # the first of equal scores
        body = body_of(best["x"])
        recipe = recipe_text(body, _header(config, population, pool, best, len(evaluations)))
    finally:
        pool.close()
    write_text_durably(paths["recipe"], recipe)
    write_csv(paths["csv"], evaluations)
    plot_fitness(paths["plot"], evaluations)
    return EvolveResult(best, evaluations, recipe, paths, body)


def _load_state(path: Path, key: str, resume: bool) -> list[dict]:
    if not path.exists():
        return []
    if not resume:
        raise EvolveError(f"a search state exists at '{path}' (an interrupted or finished search): pass --resume to "
                          "continue it, or delete it to start over")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        evaluations = data["evaluations"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EvolveError(f"cannot resume: '{path}' is unreadable; delete it to start over") from None
    if data.get("config") != key:
        raise EvolveError(f"cannot resume from '{path}': the config changed since; restore it, or delete the state to "
                          "start over")
    return evaluations


def _save_state(path: Path, key: str, config: EvolveConfig, population: int, evaluations: list[dict]) -> None:
    write_text_durably(path, json.dumps({"config": key, "seed": config.seed, "population": population,
                                         "evaluations": evaluations}))


def write_csv(path: Path, evaluations: list[dict]) -> None:
    tasks = sorted({t for e in evaluations for t in e["tasks"]})
    genes = max((len(e["x"]) for e in evaluations), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["eval", "generation", "score", *[f"task:{t}" for t in tasks], "method", "normalize",
                *[f"gene{i}" for i in range(genes)], "seconds", "cpu_seconds"])
    for e in evaluations:
        w.writerow([e["eval"], e["generation"], repr(e["score"]), *[repr(e["tasks"].get(t)) for t in tasks], e["method"],
                    e["normalize"], *[repr(v) for v in e["x"]], f"{e['seconds']:.3f}",
                    f"{e.get('cpu_seconds', 0.0):.3f}"])
    write_text_durably(path, buf.getvalue())


def plot_fitness(path: Path, evaluations: list[dict]) -> bool:
    """Every evaluation's fitness and the best so far, against evaluations (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning(f"no plot written ({path}): matplotlib is not installed (pip install 'alloykit[plot]')")
        return False
    scores = [e["score"] for e in evaluations]
    best = [max(scores[:i + 1]) for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(range(1, len(scores) + 1), scores, s=10, alpha=0.6, label="candidate")
    ax.plot(range(1, len(scores) + 1), best, color="C3", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness (mean metric over the tasks)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _header(config: EvolveConfig, population: int, pool: _Workers, best: dict, n: int) -> list[str]:
    lines = ["alloykit search evolve: CMA-ES (PyPI cmaes) over merge recipes, candidates merged in memory and scored",
             f"  on {fitness_class(config).SCORED_ON}; this recipe is the best candidate, bit for bit",
             f"genome: methods {', '.join(config.methods)}; {config.layer_groups} layer group(s); weight in "
             f"[{config.weight_range[0]:g}, {config.weight_range[1]:g}]; density in [{config.density_range[0]:g}, "
             f"{config.density_range[1]:g}]; normalize {config.normalize}",
             f"budget: {n} evaluations, population {population}, sigma {config.sigma:g}, seed {config.seed}, "
             f"{pool.n} worker(s)"]
    lines += [f"data: {r}" for r in pool.records()]
    lines.append(f"best: evaluation {best['eval']} (generation {best['generation']}), fitness "
                 f"{best['score']:.4f} (" + ", ".join(f"{t} {v:.4f}" for t, v in best["tasks"].items()) + ")")
    return lines
