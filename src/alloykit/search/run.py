"""The search commands end to end: read the models and data, search, return recipe YAML text.

Each emitted recipe is an ordinary alloykit (mergekit-schema) recipe, checked by the
recipe parser before it is returned, with a comment header recording the search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from alloykit.errors import AlloyError
from alloykit.search import inputs
from alloykit.search.adamerging import HeadEntropy, NextTokenEntropy, SearchResult, adamerging
from alloykit.search.soups import ValidationScorer, greedy_soup

_SPLITS = "the quality benchmark's splits: seed {seed}, {n_test} test / {n_val} validation examples per task"


def recipe_text(body: dict, header: Sequence[str]) -> str:
    """``# header`` lines, then the recipe as YAML (per-tensor entries in flow style); parsed once to check it."""
    from alloykit.config import parse_recipe

    parse_recipe(body)
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header) + text


def _check_inputs(tasks, data) -> None:
    if bool(tasks) == bool(data):
        raise AlloyError("give either --task (benchmark encoders with per-task heads) or --data (a causal LM's text files)")


def adamerging_search(base: str, models: Sequence[str], *, tasks: Sequence[str] | None = None,
                      data: Sequence[str] | None = None, granularity: str = "task", steps: int = 500, lr: float = 1e-3,
                      init: float = 0.3, clamp: tuple[float, float] = (0.0, 1.0), samples: int | None = 64,
                      batch_size: int = 16, seed: int = 0, max_len: int | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[str, SearchResult]:
    """AdaMerging over ``models`` (fine-tunes of ``base``); returns the task_arithmetic recipe text and the result."""
    _check_inputs(tasks, data)
    if clamp[0] > clamp[1]:
        raise AlloyError(f"--clamp {clamp[0]:g} {clamp[1]:g}: the lower bound exceeds the upper; give --clamp LO HI with LO <= HI")
    base_ref, refs, base_ck, cks = inputs.checked_pair(base, models)
    if tasks:
        max_len = max_len or 32
        names, texts = inputs.task_texts(tasks, "val", samples)
        heads = inputs.load_heads(refs, tasks)
        module, tokenizer = inputs.encoder_and_tokenizer(base_ref)
        objective = HeadEntropy(module, heads, [inputs.encode_unlabelled(tokenizer, t, max_len) for t in texts], list(tasks))
        what = (f"tasks {', '.join(tasks)}: validation-split texts, labels unused, {len(texts[0])} inputs per task "
                f"at max_len {max_len} ({_SPLITS.format(**inputs.SPLIT_SIZES)}); entropy of each task's head on its task")
    else:
        max_len = max_len or 128
        module, seqs, pad = inputs.causal_lm_and_tokens(base_ref, data, samples, max_len)
        objective = NextTokenEntropy(module, seqs, [Path(d).name for d in data], pad)
        what = (f"{', '.join(data)}: {', '.join(str(len(s)) for s in seqs)} texts, at most {max_len} tokens; "
                "entropy of the next-token distribution at every position")
    tv = inputs.task_vectors(module, base_ck, cks)
    result = adamerging(tv, objective, granularity=granularity, steps=steps, lr=lr, init=init, clamp=clamp,
                        batch_size=batch_size, seed=seed, log=log)
    body = {"merge_method": "task_arithmetic", "base_model": str(base_ref.weights),
            "models": [{"model": str(r.weights), "parameters": {"weight": result.model_weight(k)}} for k, r in enumerate(refs)],
            "parameters": {"lambda": 1.0, "normalize": False}, "dtype": "float32"}
    per_task = ", ".join(f"{n} {h:.4f}" for n, h in zip(objective.names, result.per_task_final))
    layer = (f"one coefficient per model per parameter tensor ({len(result.groups)} tensors, as in the paper's code); "
             "other tensors (buffers) keep the base's value" if granularity == "layer" else "one coefficient per model")
    header = ["alloykit search adamerging: AdaMerging (Yang et al., ICLR 2024), coefficients learned by minimising",
              "  the merged model's prediction entropy on unlabelled inputs; merged = base + sum_k weight_k * tau_k",
              f"data: {what}",
              f"granularity: {granularity}: {layer}",
              f"Adam: {steps} steps, lr {lr:g}, batch {batch_size} per task, init {init:g}, clamp [{clamp[0]:g}, {clamp[1]:g}], "
              f"seed {seed}",
              f"entropy (nats, summed over tasks): {result.entropy_init:.4f} at init -> {result.entropy_final:.4f} at the end"
              f" ({per_task})"]
    for k, r in enumerate(refs):
        c = result.coefficients[k]
        header.append(f"coefficients of {r.given}: mean {float(c.mean()):.4f}, min {float(c.min()):.4f}, max {float(c.max()):.4f}")
    return recipe_text(body, header), result


def _task_setup(base: str, models: Sequence[str], tasks: Sequence[str]):
    """Base encoder, the models' state dicts, heads and a validation evaluator at the benchmark's splits."""
    from alloykit.eval.evaluator import AccuracyEvaluator

    base_ref, refs, _, cks = inputs.checked_pair(base, models)
    task_objs, _ = inputs.task_texts(tasks, "val", None)  # unknown task names fail here, before any loading
    heads = dict(zip(tasks, inputs.load_heads(refs, tasks)))
    encoder, tokenizer = inputs.encoder_and_tokenizer(base_ref)
    sds = [{n: ck.read(n) for n in ck.tensors} for ck in cks]
    ev = AccuracyEvaluator(tokenizer, max_len=32, seed=inputs.SPLIT_SIZES["seed"], n_test=inputs.SPLIT_SIZES["n_test"],
                           n_val=inputs.SPLIT_SIZES["n_val"])
    return base_ref, refs, ValidationScorer(encoder, heads, ev, task_objs, sds)


def _soup_body(refs, chosen: Sequence[int]) -> dict:
    return {"merge_method": "linear",  # no base_model: a soup averages the fine-tunes only
            "models": [{"model": str(refs[i].weights), "parameters": {"weight": 1.0}} for i in chosen],
            "parameters": {"normalize": True}, "dtype": "float32"}


def greedy_soup_search(base: str, models: Sequence[str], tasks: Sequence[str]) -> tuple[str, dict]:
    base_ref, refs, scorer = _task_setup(base, models, tasks)
    res = greedy_soup(len(refs), scorer)
    header = ["alloykit search greedy-soup: greedy soup (Wortsman et al., ICML 2022): models sorted by validation score,",
              "  each added to the uniform average only if the score does not drop",
              f"score: mean over tasks {', '.join(tasks)} of each task head's accuracy on its validation split (never test)",
              f"  ({_SPLITS.format(**inputs.SPLIT_SIZES)})"]
    header += [f"individual {r.given}: {res.individual[i]:.4f}" for i, r in enumerate(refs)]
    header += [f"tried {refs[t['model']].given}: soup {t['soup_score_without']:.4f} -> {t['soup_score_with']:.4f}, "
               f"{'kept' if t['kept'] else 'left out'}" for t in res.trace]
    header.append(f"soup of {len(res.chosen)} of {len(refs)} models: validation score {res.score:.4f}")
    return recipe_text(_soup_body(refs, res.chosen), header), {"chosen": res.chosen, "score": res.score}


def uniform_soup_recipe(base: str, models: Sequence[str], tasks: Sequence[str] | None = None) -> tuple[str, dict]:
    header = ["alloykit search uniform-soup: uniform soup (Wortsman et al., ICML 2022): the average of every model"]
    if tasks:
        base_ref, refs, scorer = _task_setup(base, models, tasks)
        score = scorer(list(range(len(refs))))
        header.append(f"validation score (mean over tasks {', '.join(tasks)} of head accuracy): {score:.4f}")
    else:
        base_ref, refs, _, _ = inputs.checked_pair(base, models)
        score = None
    return recipe_text(_soup_body(refs, range(len(refs))), header), {"score": score}
