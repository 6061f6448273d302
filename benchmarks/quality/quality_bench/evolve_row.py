"""The ``evolve`` row: alloykit's evolutionary search (``alloykit search evolve``'s CMA-ES loop) on the
benchmark's fine-tunes.

Genome: per task fine-tune a weight in [0, 1] and a density in [0.1, 1], one per model (no layer
groups), method chosen among task_arithmetic, ties and dare_ties, normalize off; CMA-ES seeded by the
benchmark's merge seed, population 8, sigma 0.25, ``EVALS`` evaluations (the budget, in the row's
"chosen" column); ``evolve_6``: 6 evaluations, task arithmetic's lambda-grid budget. Fitness: the mean VALIDATION accuracy over the tasks (test is read once, for the
best candidate). Candidates are merged in memory through the recipe ``alloykit merge`` would run.
``EVOLVE_WORKERS=N`` scores them on N Ray actors (each builds the track and loads the seed's
fine-tunes from the cache once); the evaluations are the serial run's, in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloykit.distributed.evolve import cma_search, merge_in_memory
from alloykit.distributed.genome import EvolveConfig, Genome
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.roles import num_layers

from quality_bench.bench import Bench, mean_accuracy
from quality_bench.rows import register_row

EVALS = 64
METHODS = ["task_arithmetic", "ties", "dare_ties"]
#: EVOLVE_WORKERS=N (N > 1): score the candidates on N Ray actors, each holding the track and the fine-tunes
WORKERS = int(os.environ.get("EVOLVE_WORKERS", "1"))


class _Scorer:
    """One worker: the track, the seed's fine-tunes, and the in-memory merge and validation score of a body."""

    def __init__(self, bench: Bench | None, seed: int, track: tuple | None = None):
        if bench is None:  # in a Ray actor: build the track as the runner does, fine-tunes from the cache
            import torch

            from quality_bench.tracks import TRACKS

            torch.set_num_threads(1)
            name, cfg, cache = track
            bench = Bench(TRACKS[name](cfg, cache, lambda msg: None))
        self.bench, self.ft, self.tasks = bench, bench.finetunes(seed), bench.tasks
        self.preloaded = {"base": StateDictCheckpoint(bench.track.base_sd, "base"),
                          **{t: StateDictCheckpoint(self.ft.sd[t], t) for t in self.tasks}}

    def merged(self, body: dict) -> dict:
        return merge_in_memory(body, self.preloaded)

    def score(self, body: dict) -> dict:
        val = self.bench.score(self.merged(body), self.ft.heads, self.tasks, "val")
        return {"score": mean_accuracy(val), "tasks": {t: float(c.float().mean()) for t, c in val.items()}, "seconds": 0.0}


def evolve_row(bench: Bench, seed: int, evals: int = EVALS, population: int = 8) -> dict:
    ft, tasks = bench.finetunes(seed), bench.tasks
    base_sd = bench.track.base_sd
    local = _Scorer(bench, seed)
    config = EvolveConfig(base_model="base", models=list(tasks), tasks=list(tasks), methods=METHODS, max_evals=evals,
                          population=population, seed=bench.merge_seed)
    genome = Genome(config)
    names = list(base_sd)
    n_layers = num_layers(None, names)

    def body_of(x) -> dict:
        return genome.recipe(genome.decode(x), "base", list(tasks), names, n_layers)

    score, ray = (lambda bodies: [local.score(b) for b in bodies]), None
    if WORKERS > 1:
        import ray
        from ray.util import ActorPool

        here = str(Path(__file__).resolve().parents[1])
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
        actor = ray.remote(num_cpus=1)(_Scorer)
        track = (bench.track.name, bench.track.cfg, bench.track.cache.parent)
        pool = ActorPool([actor.remote(None, seed, track) for _ in range(WORKERS)])
        score = lambda bodies: list(pool.map(lambda a, b: a.score.remote(b), bodies))  # noqa: E731
    try:
        evaluations = cma_search(genome, score, body_of, max_evals=evals, population=population, sigma=0.25,
                                 seed=bench.merge_seed)
    finally:
        if ray is not None:
            ray.shutdown()
    best = max(evaluations, key=lambda e: e["score"])
    body = body_of(best["x"])
    bench.log(f"    evolve seed {seed}: best of {evals} evaluations: {best['method']}, val {100 * best['score']:.1f}")
    weights = ", ".join(f"{m['parameters']['weight']:.2f}" for m in body["models"])
    return {"scores": bench.score(local.merged(body), ft.heads, tasks, "test"),
            "chosen": f"{best['method']}, weights {weights} ({evals} evaluations, val {100 * best['score']:.1f})",
            "recipe": body, "workers": WORKERS,
            "evaluations": [{"score": e["score"], "method": e["method"]} for e in evaluations]}


register_row("evolve", kind="search",
             description=f"CMA-ES over {', '.join(METHODS)} recipes (weight, density per model; method gene), "
                         f"{EVALS} evaluations of mean validation accuracy (alloykit search evolve)")(evolve_row)
#: the budget of task arithmetic's lambda grid (6 points): one generation of 6
register_row("evolve_6", kind="search",
             description="the evolve row at task arithmetic's validation budget: 6 evaluations (one generation)"
             )(lambda bench, seed: evolve_row(bench, seed, evals=6, population=6))
