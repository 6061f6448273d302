"""Model soups: uniform averages of fine-tunes, the ingredients chosen greedily on validation.

Wortsman et al., ICML 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time" (arXiv:2203.05482).

* uniform soup: theta = (1/K) sum_k theta_k over all K models;
* greedy soup: sort the models by validation score, best first; start the soup with
  the best; add each next model if the uniform average of the soup plus it scores at
  least as well as the soup without it (ties keep it, as in the paper's ">=").

The score is the mean over the tasks of each task's metric on its VALIDATION split (never
test), the candidate soup being the model (:meth:`alloykit.eval.suite.TaskSuite.score`):
with task fine-tunes that keep per-task heads, each task head's accuracy on its task; with
fine-tunes of one task, the soup's own head. The result is a ``linear`` recipe (weight 1
per chosen model, normalize on: the uniform average).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alloykit.eval.evaluator import TaskModel
from alloykit.eval.suite import TaskSuite, summary_score
from alloykit.merge import merge_state_dicts


@dataclass
class SoupResult:
    chosen: list[int]  # model indices in the order they joined the soup
    individual: list[float]  # each model's own score
    score: float  # the soup's score
    trace: list[dict] = field(default_factory=list)  # one entry per model tried after the first


def greedy_soup(n_models: int, score: Callable[[list[int]], float]) -> SoupResult:
    """Wortsman et al.'s greedy soup over ``n_models``; ``score(indices)`` rates their uniform average."""
    individual = [score([i]) for i in range(n_models)]
    order = sorted(range(n_models), key=lambda i: -individual[i])  # stable: ties keep the given order
    soup, best = [order[0]], individual[order[0]]
    trace = []
    for i in order[1:]:
        s = score(soup + [i])
        kept = s >= best
        trace.append({"model": i, "soup_score_with": s, "soup_score_without": best, "kept": kept})
        if kept:
            soup, best = soup + [i], s
    return SoupResult(soup, individual, best, trace)


def uniform_average(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The soup of ``state_dicts`` as ``alloykit merge`` computes its linear recipe."""
    if len(state_dicts) == 1:
        return state_dicts[0]
    return merge_state_dicts(list(state_dicts), "linear", model_parameters=[{"weight": 1.0}] * len(state_dicts))


class SoupScorer:
    """``score(chosen)``: the suite's validation score of the uniform average of the chosen state dicts."""

    def __init__(self, suite: TaskSuite, state_dicts: Sequence[dict[str, torch.Tensor]], split: str = "validation"):
        self.suite, self.sds, self.split = suite, state_dicts, split
        self.per_task: dict[tuple[int, ...], dict[str, dict]] = {}

    def __call__(self, chosen: list[int]) -> float:
        res = self.suite.evaluate(self.split, params=uniform_average([self.sds[i] for i in chosen]))
        self.per_task[tuple(chosen)] = res
        return summary_score(res)


class ValidationScorer:
    """The quality benchmark's scorer: mean validation accuracy over tasks of the uniform average of the
    chosen encoders, each task with its linear head."""

    def __init__(self, encoder: torch.nn.Module, heads: dict[str, torch.nn.Linear], evaluator, tasks: Sequence,
                 state_dicts: Sequence[dict[str, torch.Tensor]], split: str = "val"):
        self.encoder, self.heads, self.ev, self.tasks, self.sds, self.split = encoder, heads, evaluator, tasks, state_dicts, split
        self.per_task: dict[tuple[int, ...], dict[str, float]] = {}

    def __call__(self, chosen: list[int]) -> float:
        sd = uniform_average([self.sds[i] for i in chosen])
        self.encoder.load_state_dict(sd, strict=False)
        model = TaskModel(self.encoder, self.heads)
        acc = {t.name: self.ev.evaluate(model, t, self.split)["accuracy"] for t in self.tasks}
        self.per_task[tuple(chosen)] = acc
        return sum(acc.values()) / len(acc)

