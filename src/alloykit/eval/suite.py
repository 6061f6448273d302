"""Tasks bound to a model: each task's head, its tokenized splits, evaluation and scores.

:class:`TaskSuite` is what every data command shares (``stats collect``, ``search``,
``eval``) and what a new search builds on::

    from alloykit.eval.loading import load_model, model_folder
    from alloykit.eval.suite import TaskSuite
    from alloykit.eval.taskfile import resolve_tasks

    model = load_model(model_folder("base"))
    suite = TaskSuite(model, resolve_tasks(["sentiment.yaml", "topic.yaml"]))
    suite.evaluate("test")                        # the model's own weights
    suite.score(merged_state_dict)                # a candidate (keyed like the checkpoint), on validation
    suite.record("validation")                    # what data that was: files, SHA-256, counts

Which head scores a task (first that applies): the command's ``--head``; the task file's
``head``; for an encoder, the ``heads.safetensors`` in or beside the model (or the
``heads_from`` folders: a search's fine-tunes) holding the task's key; the model's own
head (sequence classification) or next-token distribution (causal LM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open

from alloykit.errors import AlloyError
from alloykit.eval.heads import HeadError, TaskNet, body_net, head_net, linear_heads, linear_net, named_classes, own_net
from alloykit.eval.loading import POOLINGS, LoadedModel, ModelFolder, TextTokenizer, load_model, load_tokenizer, model_folder
from alloykit.eval.model import Encoded
from alloykit.eval.taskfile import resolve_tasks
from alloykit.eval.tasks import Task, TaskError, split_name, text_task

#: tokens per text unless the command or the task file says: built-in tasks as the quality benchmark
#: (32), other classification tasks 128; causal LMs take the command's own default
BUILTIN_MAX_LEN, CLASSIFIER_MAX_LEN = 32, 128


@dataclass
class BoundTask:
    task: Task
    net: TaskNet  # kind 'body': an encoder without a head (statistics that need none: Grams)
    class_map: list[int] | None  # task label index -> head output index
    max_len: int

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def next_token(self) -> bool:
        return self.net.kind == "next-token"


class TaskSuite:
    """``tasks`` bound to ``model``: heads resolved, splits tokenized on demand (cached)."""

    def __init__(self, model: LoadedModel, tasks: Sequence[Task], *, head: str | None = None, head_key: str | None = None,
                 pooling: str | None = None, max_len: int | None = None, causal_max_len: int = 512,
                 heads_from: Sequence[ModelFolder] = (), need_head: bool = True, head_option: bool = True):
        if pooling is not None and pooling not in POOLINGS:
            raise AlloyError(f"--pooling {pooling}: choose one of {', '.join(POOLINGS)}")
        self.model = model
        self.tokenizer: TextTokenizer = load_tokenizer(model)
        self.head_option = head_option  # whether the command has --head (for the messages)
        self.bound = [self._bind(t, head, head_key, pooling, max_len, causal_max_len, heads_from, need_head) for t in tasks]
        self._encoded: dict[tuple[str, str, int | None], Encoded] = {}

    # -- binding ----------------------------------------------------------------------------
    def _bind(self, task: Task, head, head_key, pooling, max_len, causal_max_len, heads_from, need_head) -> BoundTask:
        model = self.model
        pooling = pooling or task.pooling or model.folder.sentence_pooling() or "mean"
        key = head_key or task.key
        where = head or task.head
        if where is not None:
            net = head_net(model, where, key=key, pooling=pooling)
        elif model.family == "encoder":
            found = next((f.heads_file for f in (model.folder, *heads_from) if f.heads_file is not None
                          and key in _keys(f.heads_file)), None)
            if found is not None:
                net = linear_net(model, linear_heads(found, [key])[key], pooling, f"{found}[{key}]")
            elif need_head:
                how = ("'head:' in its task file, or --head" if self.head_option and not task.builtin and task.path
                       else "--head" if self.head_option else "a task file (--task TASK.yaml) whose 'head:' names it")
                raise HeadError(f"task '{task.name}': no head for encoder '{model.folder.given}' "
                                f"({model.folder.architecture}) to score it with; give {how}: a fine-tuned "
                                f"sequence-classification folder, or a heads.safetensors holding {key}.weight and "
                                f"{key}.bias")
            else:
                net = body_net(model)
        else:
            net = own_net(model)
        if net.kind == "next-token":
            length = max_len or task.max_len or causal_max_len
        else:
            length = max_len or task.max_len or (BUILTIN_MAX_LEN if task.builtin else CLASSIFIER_MAX_LEN)
        # a model with learned positions cannot read past its table (BERT's index error otherwise)
        positions = model.folder.config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            length = min(length, positions)
        return BoundTask(task, net, self._class_map(task, net), length)

    @staticmethod
    def _class_map(task: Task, net: TaskNet) -> list[int] | None:
        if net.kind != "classifier" or task.label_kind is None:
            return None
        labels = task.labels
        if task.label_kind == "name" and named_classes(net.id2label):
            index = {v: k for k, v in net.id2label.items()}
            missing = [lab for lab in labels if lab not in index]
            if missing:
                raise TaskError(f"task '{task.name}': label '{missing[0]}' is not a class of the {net.describe} "
                                f"({', '.join(net.id2label[i] for i in sorted(net.id2label))}, from its config.json "
                                "id2label); use the head's class names")
            return [index[lab] for lab in labels]
        if task.label_kind == "name" and net.id2label is not None and not task.builtin and task.label_names is None:
            where = "under 'labels:' in the task file" if task.path else "under 'labels:' in a task file naming the data"
            raise TaskError(f"task '{task.name}': its labels are names ({', '.join(labels[:4])}) and the {net.describe} "
                            "does not name its classes (config.json id2label is LABEL_0, LABEL_1...); list the names in "
                            f"head-output order {where}, or give integer labels")
        if len(labels) > net.classes:
            raise TaskError(f"task '{task.name}' has {len(labels)} classes; the {net.describe} has {net.classes} outputs")
        return list(range(len(labels)))

    def task(self, name: str) -> BoundTask:
        return next(b for b in self.bound if b.name == name)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bound]

    # -- data -------------------------------------------------------------------------------
    def encoded(self, name: str, split: str, samples: int | None = None) -> Encoded:
        """The first ``samples`` texts of ``split`` as token ids (labels mapped to head outputs; -1: none).
        Texts with fewer tokens than the task needs (2 for next-token scoring) are left out."""
        split = split_name(split)
        key = (name, split, samples)
        if key not in self._encoded:
            b = self.task(name)
            part = b.task.split(split)
            need = 2 if b.next_token else 1
            seqs, labels = [], []
            for text, label in zip(part.texts, part.labels or [-1] * len(part.texts)):
                if samples is not None and len(seqs) >= samples:
                    break
                ids = self.tokenizer.encode(text, b.max_len)
                if len(ids) >= need:
                    seqs.append(ids)
                    labels.append(b.class_map[label] if b.class_map is not None and label >= 0 else -1)
            if not seqs:
                raise TaskError(f"task '{name}': its {split} split gave no text of {need}+ tokens")
            self._encoded[key] = _pad(seqs, labels, self.tokenizer.pad_id)
        return self._encoded[key]

    def record(self, split: str, samples: int | None = None) -> list[dict]:
        """Per task: the data of ``split`` (files and SHA-256, or the built-in source), how many were used,
        the head and the tokenization."""
        out = []
        for b in self.bound:
            used = len(self.encoded(b.name, split, samples))
            rec = b.task.record(split, used=used)
            rec.update({"head": b.net.describe, "max_len": b.max_len, "tokens": self.tokenizer.describe})
            out.append(rec)
        return out

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test", *, params: dict[str, torch.Tensor] | None = None, samples: int | None = None,
                 batch_size: int = 32) -> dict[str, dict]:
        """Each task's metric on ``split`` with the model's weights, or with ``params`` (a state dict keyed
        like the model's checkpoint): accuracy (95% Wilson interval), macro F1 or perplexity (95%
        bootstrap intervals over the examples)."""
        return {b.name: self._evaluate(b, split, params, samples, batch_size) for b in self.bound}

    def score(self, params: dict[str, torch.Tensor] | None = None, split: str = "validation",
              samples: int | None = None) -> float:
        """One number to maximise: the mean over tasks of accuracy / macro F1, or of minus the mean
        next-token loss for perplexity tasks."""
        return summary_score(self.evaluate(split, params=params, samples=samples))

    def _evaluate(self, b: BoundTask, split: str, params, samples, batch_size) -> dict:
        metric = b.task.metric_name
        if b.net.kind == "body":
            raise HeadError(f"task '{b.name}': no head to evaluate encoder '{self.model.folder.given}' with")
        if b.next_token != (metric == "perplexity"):
            what = ("a causal LM: give a task with 'metric: perplexity'" if b.next_token
                    else f"a classifier; task '{b.name}' {'has no labels' if b.task.label_kind is None else 'asks for perplexity'}: "
                         "give labelled data and metric accuracy or macro_f1")
            raise TaskError(f"task '{b.name}': metric {metric} cannot score model '{self.model.folder.given}', {what}")
        data = self.encoded(b.name, split, samples)
        order = torch.argsort(data.lengths, stable=True)  # batches of similar length: little padding
        per_example = torch.zeros(len(data), 2, dtype=torch.float64)  # (correct or nll, 1 or tokens)
        preds = torch.zeros(len(data), dtype=torch.long)
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            ids, mask = data.batch(idx)
            logits = b.net.logits(ids, mask, params).float()
            if b.next_token:
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:] * mask[:, :-1]
                per_example[idx, 0] = nll.sum(1).double()
                per_example[idx, 1] = (mask[:, 1:] * mask[:, :-1]).sum(1).double()
            else:
                preds[idx] = logits.argmax(-1)
        out = {"task": b.name, "split": split_name(split), "metric": metric, "n": len(data), "head": b.net.describe}
        if b.next_token:
            nll, tokens = float(per_example[:, 0].sum()), float(per_example[:, 1].sum())
            lo, hi = _bootstrap(per_example, lambda s: math.exp(float(s[:, 0].sum() / s[:, 1].sum())))
            out.update({"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "value": math.exp(nll / tokens),
                        "tokens": int(tokens), "ci95": [lo, hi]})
        else:
            labels = data.labels
            if bool((labels < 0).any()):
                raise TaskError(f"task '{b.name}': its {split} split has texts without labels")
            correct = int((preds == labels).sum())
            acc = correct / len(data)
            out.update({"accuracy": acc, "correct": correct, "classes": b.net.classes})
            if metric == "accuracy":
                out.update({"value": acc, "ci95": list(_wilson(correct, len(data)))})
            else:
                both = torch.stack([preds, labels], 1)
                out.update({"value": _macro_f1(both), "ci95": list(_bootstrap(both, _macro_f1))})
        return out


def summary_score(results: dict[str, dict]) -> float:
    """Mean over tasks of accuracy / macro F1, or of minus the mean next-token loss (perplexity tasks)."""
    return sum(-r["loss"] if r["metric"] == "perplexity" else r["value"] for r in results.values()) / len(results)


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.rsplit(".", 1)[0] for k in f.keys()}


def _pad(seqs: list[list[int]], labels: list[int], pad_id: int) -> Encoded:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return Encoded(ids, torch.tensor([len(s) for s in seqs]), torch.tensor(labels, dtype=torch.long))


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion k/n (sound at small n and near 0 or 1)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _macro_f1(pairs: torch.Tensor) -> float:
    """Mean over the classes present (in labels or predictions) of F1; ``pairs`` is [n, 2] (pred, label)."""
    pred, gold = pairs[:, 0], pairs[:, 1]
    f1 = []
    for c in torch.unique(torch.cat([pred, gold])).tolist():
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1) / len(f1)


def _bootstrap(rows: torch.Tensor, stat, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over ``draws`` resamples of the rows (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(rows.shape[0], (draws, rows.shape[0]), generator=gen)
    values = sorted(stat(rows[i]) for i in idx)
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def command_tasks(tasks: Sequence[str] | None, data: str | None) -> list[Task]:
    """The tasks a command runs on: ``--task`` (names or task files) or one ``--data`` file."""
    if bool(tasks) == bool(data):
        raise TaskError("give the data: --task TASK... (built-in task names or task files, TASK.yaml) or --data FILE "
                        "(.txt, one text per line, or .jsonl with \"text\" and optionally \"label\"), not both")
    return resolve_tasks(tasks) if tasks else [text_task(data)]


def evaluate_folder(model: str, *, tasks: Sequence[str] | None = None, data: str | None = None, split: str = "test",
                    samples: int | None = None, batch_size: int = 32, max_len: int | None = None, head: str | None = None,
                    head_key: str | None = None, model_class: str | None = None, pooling: str | None = None) -> dict:
    """``alloykit eval``: the model folder's metric on each task's ``split`` (or on a ``--data`` file)."""
    split = split_name(split)
    task_list = command_tasks(tasks, data)
    loaded = load_model(model_folder(model, model_class))
    suite = TaskSuite(loaded, task_list, head=head, head_key=head_key, pooling=pooling, max_len=max_len)
    results = suite.evaluate(split, samples=samples, batch_size=batch_size)
    for b in suite.bound:
        results[b.name]["data"] = b.task.record(split, used=results[b.name]["n"])
    return {"model": model, "family": loaded.family, "split": split, "results": list(results.values())}
