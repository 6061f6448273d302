"""``search evolve``'s workers: the models loaded once, each candidate recipe merged in memory
and scored, on alloykit's evaluation tasks (:class:`Fitness`) or on lm-evaluation-harness
tasks (:class:`LmEvalFitness`, the config's ``lm_eval:``).

A worker is one Ray actor (or the search's own process). It loads the base and the
fine-tunes once (every method forms its task vectors from them), plans each candidate's
recipe with those checkpoints preloaded and merges it through the ordinary executor into a
state dict: no checkpoint is written, and the tensors are the bytes ``alloykit merge`` of the
recipe writes. Every worker computes with one thread, so a score is the candidate's, not the
worker's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import torch

from alloykit.distributed.genome import EvolveConfig
from alloykit.errors import AlloyError
from alloykit.eval.loading import load_model
from alloykit.eval.suite import TaskSuite, command_tasks, summary_score
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.plan.executor import run_jobs
from alloykit.request import MergeRequest
from alloykit.search import inputs

_log = logging.getLogger(__name__)


class EvolveError(AlloyError):
    pass


def merge_in_memory(body: dict, preloaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A recipe's merge into a state dict, its models found in ``preloaded`` (ref -> checkpoint,
    e.g. ``StateDictCheckpoint``) under the names the recipe gives them: the planner and executor
    ``alloykit merge`` runs, so the result is the bytes ``alloykit merge`` of the recipe writes."""
    plan = MergeRequest.of(body).plan(preloaded=dict(preloaded))
    out: dict[str, torch.Tensor] = {}
    run_jobs(plan, out.__setitem__, threads=1, progress=False)
    return out


class Fitness:
    """One worker scoring on alloykit's tasks: the tasks bound to the base; a candidate's score is
    the mean validation metric over them (the validation split only; test stays unseen)."""

    #: what a score is, for the best recipe's header
    SCORED_ON = "the tasks' validation splits (mean metric)"

    def __init__(self, config: EvolveConfig | dict):
        c = config if isinstance(config, EvolveConfig) else EvolveConfig.model_validate(config)
        self.config = c
        base_folder, folders, base_ck, cks = inputs.checked_pair(c.base_model, c.models, c.model_class)
        # the recipes name the models by these paths; the plan finds them preloaded under the same names
        self.preloaded = {str(f.path): StateDictCheckpoint({n: ck.read(n) for n in ck.tensors}, str(f.path))
                          for f, ck in zip([base_folder, *folders], [base_ck, *cks])}
        for ck in (base_ck, *cks):
            ck.close()
        self._bind(base_folder, folders)

    def _bind(self, base_folder, folders) -> None:
        c = self.config
        self.suite = TaskSuite(load_model(base_folder), command_tasks(c.tasks, None), pooling=c.pooling,
                               max_len=c.max_len, causal_max_len=128, heads_from=folders, head_option=False)

    def merged(self, body: dict) -> dict[str, torch.Tensor]:
        return merge_in_memory(body, self.preloaded)

    def evaluate(self, body: dict) -> dict[str, Any]:
        t0, c0 = time.monotonic(), time.process_time()
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # the same arithmetic in every worker: the score is the candidate's, not the worker's
        try:
            score, per_task = self.score(self.merged(body))
        finally:
            torch.set_num_threads(previous)
        return {"score": score, "tasks": per_task, "seconds": time.monotonic() - t0,
                "cpu_seconds": time.process_time() - c0, "pid": os.getpid()}

    def score(self, params: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """(fitness, {task: metric}) of merged parameters."""
        res = self.suite.evaluate("validation", params=params, samples=self.config.samples)
        return summary_score(res), {n: r["value"] for n, r in res.items()}

    def records(self) -> list[dict]:
        """What the fitness read, for the best recipe's header (``data: ...`` lines)."""
        from alloykit.eval.tasks import describe_record

        return [describe_record(r) for r in self.suite.record("validation", self.config.samples)]


class LmEvalFitness(Fitness):
    """One worker scoring on lm-evaluation-harness tasks: the base (or first model) loaded once as
    a transformers causal LM with its tokenizer; each candidate's merged tensors are copied into it
    and the harness scores it through ``alloykit eval --lm-eval``'s code (``evaluate_lm``), so the
    fitness is what ``alloykit eval OUT --lm-eval TASK...`` reports for ``alloykit merge``'s OUT.
    Fitness: the mean over the tasks of each one's metric, negated where the harness says lower is
    better (perplexity, bits_per_byte)."""

    SCORED_ON = "lm-evaluation-harness tasks (mean metric; lower-is-better metrics negated)"

    def _bind(self, base_folder, folders) -> None:
        from alloykit.eval import lm_harness

        e = self.config.lm_eval
        self.pairs = e.task_metrics()
        self.tasks = [t for t, _ in self.pairs]
        self.task_manager = lm_harness.task_manager(self.tasks, e.include_path, what="lm_eval task",
                                                    include_what="lm_eval include_path")
        with _harness_output_hidden():
            self.model, self.tokenizer = lm_harness.load_model(base_folder.path, e.dtype)
        # tensors of the causal LM that the checkpoints lack must be ties (lm_head = embed_tokens), which
        # the load refreshes through their source; anything else would keep a stale value
        held, own = set(self.preloaded[str(base_folder.path)].tensors), self.model.state_dict()
        loaded = {own[n].data_ptr() for n in held if n in own}
        stale = [n for n in own if n not in held and own[n].data_ptr() not in loaded]
        if stale:
            raise EvolveError(f"lm_eval fitness: the models have no tensor '{stale[0]}', which the causal LM built from "
                              f"'{base_folder.given}'s config.json needs; give models transformers loads whole")
        self.options = {"limit": e.harness_limit(), "batch_size": e.batch_size, "num_fewshot": e.num_fewshot,
                        "seed": self.config.seed, "bootstrap_iters": 0}

    def score(self, params: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        from alloykit.eval.lm_harness import evaluate_lm

        missing, unexpected = self.model.load_state_dict(params, strict=False)
        if unexpected:
            raise EvolveError(f"lm_eval fitness: tensor '{unexpected[0]}' of the merge is not in the causal LM "
                              "transformers builds from the base's config.json")
        with _harness_output_hidden():
            res = evaluate_lm(self.model, self.tokenizer, self.tasks, self.task_manager, **self.options)
        values, fitness = {}, []
        for task, metric in self.pairs:
            got = res["results"].get(task, {})
            if metric not in got:
                shown = ", ".join(k for k in got if not k.endswith("_stderr")) or "none"
                raise EvolveError(f"lm_eval metric '{metric}' is not reported for task '{task}' (its metrics: {shown}); "
                                  "set lm_eval.metric, or the task's own metric: {name: TASK, metric: M}")
            values[task] = float(got[metric])
            lower_better = res["higher_is_better"].get(task, {}).get(metric) is False
            fitness.append(-values[task] if lower_better else values[task])
        return sum(fitness) / len(fitness), values

    def records(self) -> list[str]:
        e = self.config.lm_eval
        where = f" from {', '.join(e.include_path)}" if e.include_path else ""
        return [f"lm-evaluation-harness task {t}{where}, metric {m}, "
                f"{'limit ' + format(e.limit, 'g') if e.limit else 'every example'}" for t, m in self.pairs]


@contextlib.contextmanager
def _harness_output_hidden():
    """The harness writes to stderr on every run (progress bars of datasets, requests and tokenizing,
    warnings about the model instance, a git probe's error outside a repository), and a search runs
    it hundreds of times: stderr goes to /dev/null meanwhile (its errors still come back as
    exceptions), the search's own progress stays readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)  # what subprocesses and C code write
            with contextlib.redirect_stderr(null), _logger_level("lm_eval", logging.ERROR):  # what Python writes
                yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    """A logger's level for a while (lm_eval's warnings reach pytest's and the user's handlers, not just fd 2)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def fitness_class(config: EvolveConfig) -> type[Fitness]:
    return LmEvalFitness if config.lm_eval is not None else Fitness
