"""Search rows of the quality benchmark: AdaMerging (task- and layer-wise), greedy and uniform soups.

Each search sees the validation split only: AdaMerging its inputs' texts without labels
(the paper adapts on unlabelled TEST inputs, test-time adaptation; here the validation
inputs stand in, so the test split stays unseen), the soups its labels (validation
accuracy, as in Wortsman et al.). The chosen recipe is merged through the planner
(:func:`alloykit.merge_state_dicts`, exactly what ``alloykit merge`` of the emitted
recipe computes) and scored once on test.
"""

from __future__ import annotations

from typing import Any

from alloykit.search.adamerging import HeadEntropy, TaskVectorModel, adamerging
from alloykit.search.soups import ValidationScorer, greedy_soup

SEARCH_METHODS = ("adamerging_task", "adamerging_layer", "greedy_soup", "uniform_soup")


def _row(bench, sd: dict, chosen: str, extra: dict) -> dict[str, Any]:
    from alloykit.eval.benchmark import _avg

    val = bench.score(sd, bench.ft_heads, bench.tasks, "val")
    test = bench.score(sd, bench.ft_heads, bench.tasks, "test")
    return {"status": "ok", "chosen": chosen, "val_avg": _avg(val), "test": test, "avg": _avg(test),
            "norm_avg": bench._norm(test, bench.ft_test), "search": extra}


def _adamerging(bench, granularity: str) -> dict[str, Any]:
    from alloykit.eval.model import load_encoder
    from alloykit.merge import merge_state_dicts

    cfg, names = bench.cfg, [t.name for t in bench.tasks]
    encoder = load_encoder(bench.base_path)  # its own module: bench.work has state dicts loaded into it
    encoder.requires_grad_(False)
    tv = TaskVectorModel({n: p.detach() for n, p in encoder.named_parameters()},
                         [bench.ft_sd[n].__getitem__ for n in names])
    data = [bench.ev.encoded(t, "val").head(cfg.search_samples) for t in bench.tasks]  # HeadEntropy reads ids only
    objective = HeadEntropy(encoder, [bench.ft_heads[n] for n in names], data, names)
    res = adamerging(tv, objective, granularity=granularity, steps=cfg.search_steps, lr=cfg.search_lr, seed=cfg.merge_seed)
    sd = merge_state_dicts([bench.ft_sd[n] for n in names], "task_arithmetic", base=bench.base_sd,
                           parameters={"lambda": 1.0, "normalize": False},
                           model_parameters=[{"weight": res.model_weight(k)} for k in range(len(names))])
    lam = res.coefficients
    if granularity == "task":
        chosen = "lambda " + ", ".join(f"{float(v):.2f}" for v in lam[:, 0])
    else:
        chosen = f"{lam.shape[1]} lambdas per model, mean " + ", ".join(f"{float(v):.2f}" for v in lam.mean(1))
    bench.log(f"    adamerging {granularity}: entropy {res.entropy_init:.3f} -> {res.entropy_final:.3f}; {chosen}")
    extra = {"granularity": granularity, "steps": cfg.search_steps, "lr": cfg.search_lr, "samples_per_task": len(data[0]),
             "entropy_init": res.entropy_init, "entropy_final": res.entropy_final,
             "coefficient_mean": lam.mean(1).tolist(), "coefficient_min": lam.min(1).values.tolist(),
             "coefficient_max": lam.max(1).values.tolist()}
    return _row(bench, sd, f"{chosen} ({cfg.search_steps} steps)", extra)


def _soup(bench, greedy: bool) -> dict[str, Any]:
    from alloykit.merge import merge_state_dicts

    names = [t.name for t in bench.tasks]
    scorer = ValidationScorer(bench.work, bench.ft_heads, bench.ev, bench.tasks, [bench.ft_sd[n] for n in names])
    if greedy:
        res = greedy_soup(len(names), scorer)
        chosen, extra = res.chosen, {"individual_val": dict(zip(names, res.individual)), "trace": res.trace}
    else:
        chosen, extra = list(range(len(names))), {}
    sds = [bench.ft_sd[names[i]] for i in chosen]
    sd = sds[0] if len(sds) == 1 else merge_state_dicts(sds, "linear", model_parameters=[{"weight": 1.0}] * len(sds))
    extra["ingredients"] = [names[i] for i in chosen]
    label = f"{len(chosen)} of {len(names)}: " + ", ".join(names[i] for i in chosen) if greedy else "all models"
    return _row(bench, sd, label, extra)


def search_row(bench, name: str) -> dict[str, Any]:
    """The benchmark row of one search method (see :data:`SEARCH_METHODS`)."""
    if name not in SEARCH_METHODS:
        return {"status": "n/a", "reason": f"unknown search method (known: {', '.join(SEARCH_METHODS)})"}
    if name.startswith("adamerging"):
        return _adamerging(bench, name.split("_")[1])
    return _soup(bench, greedy=name == "greedy_soup")
