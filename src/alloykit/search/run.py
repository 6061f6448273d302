"""The search commands end to end: read the models and data, search, return recipe YAML text.

Each emitted recipe is an ordinary alloykit (mergekit-schema) recipe, checked by the
recipe parser before it is returned, with a comment header recording the search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import yaml

from alloykit.config import parse_recipe
from alloykit.errors import AlloyError
from alloykit.eval.loading import LoadedModel, load_model
from alloykit.eval.suite import TaskSuite, command_tasks
from alloykit.eval.tasks import describe_record, text_task
from alloykit.search import inputs
from alloykit.search.adamerging import SearchResult, SuiteEntropy, adamerging
from alloykit.search.soups import SoupScorer, greedy_soup


def recipe_text(body: dict, header: Sequence[str]) -> str:
    """``# header`` lines, then the recipe as YAML (per-tensor entries in flow style); parsed once to check it."""
    parse_recipe(body)
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header) + text


def _suite(base: LoadedModel, folders, tasks, data, *, pooling, max_len, causal_max_len, samples) -> tuple[TaskSuite, list[str]]:
    """The tasks (or ``data`` files, one task each) bound to the base (heads: the task files', else the
    fine-tunes' heads.safetensors, else the model's own), and the header lines recording their validation data."""
    task_list = command_tasks(tasks, None) if tasks else [text_task(d) for d in data]
    suite = TaskSuite(base, task_list, pooling=pooling, max_len=max_len, causal_max_len=causal_max_len,
                      heads_from=folders, head_option=False)
    return suite, [f"data: {describe_record(r)}" for r in suite.record("validation", samples)]


def adamerging_search(base: str, models: Sequence[str], *, tasks: Sequence[str] | None = None,
                      data: Sequence[str] | None = None, granularity: str = "task", steps: int = 500, lr: float = 1e-3,
                      init: float = 0.3, clamp: tuple[float, float] = (0.0, 1.0), samples: int | None = 64,
                      batch_size: int = 16, seed: int = 0, max_len: int | None = None, model_class: str | None = None,
                      pooling: str | None = None, log: Callable[[str], None] | None = None) -> tuple[str, SearchResult]:
    """AdaMerging over ``models`` (fine-tunes of ``base``) on the validation inputs of ``tasks`` (names or
    task files) or on ``data`` files (one task each); returns the task_arithmetic recipe text and the result."""
    if bool(tasks) == bool(data):
        raise AlloyError("give either --task (built-in task names or task files) or --data (text files, one per data set)")
    if clamp[0] > clamp[1]:
        raise AlloyError(f"--clamp {clamp[0]:g} {clamp[1]:g}: the lower bound exceeds the upper; give --clamp LO HI with LO <= HI")
    base_folder, folders, base_ck, cks = inputs.checked_pair(base, models, model_class)
    loaded = load_model(base_folder)
    suite, lines = _suite(loaded, folders, tasks, data, pooling=pooling, max_len=max_len, causal_max_len=128,
                          samples=samples)
    objective = SuiteEntropy(suite, "validation", samples)
    how = ("entropy of the next-token distribution at every position" if suite.bound[0].next_token
           else "entropy of each task's head on its own task's validation inputs, labels unused")
    tv = inputs.task_vectors(loaded, base_ck, cks)
    result = adamerging(tv, objective, granularity=granularity, steps=steps, lr=lr, init=init, clamp=clamp,
                        batch_size=batch_size, seed=seed, log=log)
    body = {"merge_method": "task_arithmetic", "base_model": str(base_folder.path),
            "models": [{"model": str(f.path), "parameters": {"weight": result.model_weight(k)}} for k, f in enumerate(folders)],
            "parameters": {"lambda": 1.0, "normalize": False}, "dtype": "float32"}
    per_task = ", ".join(f"{n} {h:.4f}" for n, h in zip(objective.names, result.per_task_final))
    layer = (f"one coefficient per model per parameter tensor ({len(result.groups)} tensors, as in the paper's code); "
             "other tensors (buffers) keep the base's value" if granularity == "layer" else "one coefficient per model")
    header = ["alloykit search adamerging: AdaMerging (Yang et al., ICLR 2024), coefficients learned by minimising",
              "  the merged model's prediction entropy on unlabelled inputs; merged = base + sum_k weight_k * tau_k",
              f"objective: {how}", *lines,
              f"granularity: {granularity}: {layer}",
              f"Adam: {steps} steps, lr {lr:g}, batch {batch_size} per task, init {init:g}, clamp [{clamp[0]:g}, {clamp[1]:g}], "
              f"seed {seed}",
              f"entropy (nats, summed over tasks): {result.entropy_init:.4f} at init -> {result.entropy_final:.4f} at the end"
              f" ({per_task})"]
    for k, f in enumerate(folders):
        c = result.coefficients[k]
        header.append(f"coefficients of {f.given}: mean {float(c.mean()):.4f}, min {float(c.min()):.4f}, max {float(c.max()):.4f}")
    return recipe_text(body, header), result


def _task_setup(base: str | None, models: Sequence[str], tasks: Sequence[str], *, model_class=None, pooling=None,
                max_len=None):
    """The models' state dicts and a scorer of their soups on the tasks' validation splits."""
    base_folder, folders, _, cks = inputs.checked_pair(base, models, model_class)
    suite, lines = _suite(load_model(base_folder), folders, tasks, None, pooling=pooling, max_len=max_len,
                          causal_max_len=128, samples=None)
    sds = [{n: ck.read(n) for n in ck.tensors} for ck in cks]
    return folders, SoupScorer(suite, sds), lines


def _soup_body(folders, chosen: Sequence[int]) -> dict:
    return {"merge_method": "linear",  # no base_model: a soup averages the fine-tunes only
            "models": [{"model": str(folders[i].path), "parameters": {"weight": 1.0}} for i in chosen],
            "parameters": {"normalize": True}, "dtype": "float32"}


_SCORE = ("score: mean over the tasks of each task's metric on its validation split (never test): accuracy or macro F1, "
          "minus the mean next-token loss for perplexity tasks")


def greedy_soup_search(base: str | None, models: Sequence[str], tasks: Sequence[str], **kw) -> tuple[str, dict]:
    folders, scorer, lines = _task_setup(base, models, tasks, **kw)
    res = greedy_soup(len(folders), scorer)
    header = ["alloykit search greedy-soup: greedy soup (Wortsman et al., ICML 2022): models sorted by validation score,",
              "  each added to the uniform average only if the score does not drop", _SCORE, *lines]
    header += [f"individual {f.given}: {res.individual[i]:.4f}" for i, f in enumerate(folders)]
    header += [f"tried {folders[t['model']].given}: soup {t['soup_score_without']:.4f} -> {t['soup_score_with']:.4f}, "
               f"{'kept' if t['kept'] else 'left out'}" for t in res.trace]
    header.append(f"soup of {len(res.chosen)} of {len(folders)} models: validation score {res.score:.4f}")
    return recipe_text(_soup_body(folders, res.chosen), header), {"chosen": res.chosen, "score": res.score}


def uniform_soup_recipe(base: str | None, models: Sequence[str], tasks: Sequence[str] | None = None, **kw) -> tuple[str, dict]:
    header = ["alloykit search uniform-soup: uniform soup (Wortsman et al., ICML 2022): the average of every model"]
    if tasks:
        folders, scorer, lines = _task_setup(base, models, tasks, **kw)
        score = scorer(list(range(len(folders))))
        header += [_SCORE, *lines, f"validation score: {score:.4f}"]
    else:
        _, folders, _, _ = inputs.checked_pair(base, models, kw.get("model_class"))
        score = None
    return recipe_text(_soup_body(folders, range(len(folders))), header), {"score": score}
