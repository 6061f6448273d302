"""Evaluation harness: text-classification tasks over installed data, a MiniLM
encoder with one linear head per task, fine-tuning, and accuracy evaluation.

Only the encoder is merged; each task keeps its own head (as in the task-arithmetic
and TIES papers). ``benchmarks/quality/run.py`` builds the benchmark on it.
"""

from alloykit.eval.data import DataMissingError, Split, Splits
from alloykit.eval.evaluator import AccuracyEvaluator, Evaluator, TaskModel
from alloykit.eval.tasks import Task, all_tasks, get_task, register_task

__all__ = ["AccuracyEvaluator", "DataMissingError", "Evaluator", "Split", "Splits", "Task", "TaskModel", "all_tasks",
           "get_task", "register_task"]
