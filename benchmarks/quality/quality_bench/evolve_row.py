"""The ``evolve`` row: alloykit's evolutionary search (``alloykit search evolve``'s CMA-ES loop) on the
benchmark's fine-tunes.

Genome: per task fine-tune a weight in [0, 1] and a density in [0.1, 1], one per model (no layer
groups), method chosen among task_arithmetic, ties and dare_ties, normalize off; CMA-ES seeded by the
benchmark's merge seed, population 8, sigma 0.25, ``EVALS`` evaluations (the budget, in the row's
"chosen" column); ``evolve_6``: 6 evaluations, task arithmetic's lambda-grid budget. Fitness: the mean VALIDATION accuracy over the tasks (test is read once, for the
best candidate). Candidates are merged in memory through the recipe ``alloykit merge`` would run.
"""

from __future__ import annotations

from alloykit.distributed.evolve import cma_search, merge_in_memory
from alloykit.distributed.genome import EvolveConfig, Genome
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.roles import num_layers

from quality_bench.bench import Bench, mean_accuracy
from quality_bench.rows import register_row

EVALS = 64
METHODS = ["task_arithmetic", "ties", "dare_ties"]


def evolve_row(bench: Bench, seed: int, evals: int = EVALS, population: int = 8) -> dict:
    ft, tasks = bench.finetunes(seed), bench.tasks
    base_sd = bench.track.base_sd
    preloaded = {"base": StateDictCheckpoint(base_sd, "base"), **{t: StateDictCheckpoint(ft.sd[t], t) for t in tasks}}
    config = EvolveConfig(base_model="base", models=list(tasks), tasks=list(tasks), methods=METHODS, max_evals=evals,
                          population=population, seed=bench.merge_seed)
    genome = Genome(config)
    names = list(base_sd)
    n_layers = num_layers(None, names)

    def body_of(x) -> dict:
        return genome.recipe(genome.decode(x), "base", list(tasks), names, n_layers)

    def score(bodies: list[dict]) -> list[dict]:
        out = []
        for body in bodies:
            val = bench.score(merge_in_memory(body, preloaded), ft.heads, tasks, "val")
            out.append({"score": mean_accuracy(val), "tasks": {t: float(c.float().mean()) for t, c in val.items()},
                        "seconds": 0.0})
        return out

    evaluations = cma_search(genome, score, body_of, max_evals=evals, population=population, sigma=0.25,
                             seed=bench.merge_seed)
    best = max(evaluations, key=lambda e: e["score"])
    body = body_of(best["x"])
    bench.log(f"    evolve seed {seed}: best of {evals} evaluations: {best['method']}, val {100 * best['score']:.1f}")
    weights = ", ".join(f"{m['parameters']['weight']:.2f}" for m in body["models"])
    return {"scores": bench.score(merge_in_memory(body, preloaded), ft.heads, tasks, "test"),
            "chosen": f"{best['method']}, weights {weights} ({evals} evaluations, val {100 * best['score']:.1f})",
            "recipe": body, "evaluations": [{"score": e["score"], "method": e["method"]} for e in evaluations]}


register_row("evolve", kind="search",
             description=f"CMA-ES over {', '.join(METHODS)} recipes (weight, density per model; method gene), "
                         f"{EVALS} evaluations of mean validation accuracy (alloykit search evolve)")(evolve_row)
#: the budget of task arithmetic's lambda grid (6 points): one generation of 6
register_row("evolve_6", kind="search",
             description="the evolve row at task arithmetic's validation budget: 6 evaluations (one generation)"
             )(lambda bench, seed: evolve_row(bench, seed, evals=6, population=6))
