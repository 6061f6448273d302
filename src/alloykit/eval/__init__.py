"""Tasks, task heads and evaluation: what the data commands (``stats``, ``search``, ``eval``) share.

* :mod:`~alloykit.eval.tasks` -- :class:`Task`: built-in tasks over installed data (registry:
  :func:`get_task`, :func:`register_task`) and task files (:mod:`~alloykit.eval.taskfile`,
  :func:`resolve_task`: a name or a TASK.yaml);
* :mod:`~alloykit.eval.textfiles` -- the one reader of ``.txt`` / ``.jsonl`` data files;
* :mod:`~alloykit.eval.loading` -- a model folder's family (encoder, sequence classification,
  causal LM), loading it offline, its tokenizer;
* :mod:`~alloykit.eval.heads` -- task heads (a model's own, another folder's, heads.safetensors);
* :mod:`~alloykit.eval.suite` -- :class:`TaskSuite`: tasks bound to a model; evaluation, scores,
  data records.

The quality benchmark's harness (``benchmarks/quality``) builds on the same tasks, with a MiniLM
encoder and one linear head per task (:mod:`~alloykit.eval.model`, :mod:`~alloykit.eval.evaluator`).
"""

from alloykit.eval.data import DataMissingError, Split, Splits
from alloykit.eval.evaluator import AccuracyEvaluator, Evaluator, TaskModel
from alloykit.eval.loading import LoadedModel, ModelFolder, load_model, model_folder
from alloykit.eval.suite import TaskSuite, evaluate_folder
from alloykit.eval.taskfile import load_task_file, resolve_task, resolve_tasks
from alloykit.eval.tasks import Task, all_tasks, get_task, register_task

__all__ = ["AccuracyEvaluator", "DataMissingError", "Evaluator", "LoadedModel", "ModelFolder", "Split", "Splits", "Task",
           "TaskModel", "TaskSuite", "all_tasks", "evaluate_folder", "get_task", "load_model", "load_task_file",
           "model_folder", "register_task", "resolve_task", "resolve_tasks"]
