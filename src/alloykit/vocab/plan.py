"""The planner's hooks for tokenizer merges: build the output vocabulary and attach a
row remap to every embedding/head job (the jobs stay one tensor per model: streaming)."""

from __future__ import annotations

import logging

from alloykit.config import Recipe
from alloykit.errors import PlanError
from alloykit.vocab.build import VocabPlan, build_vocab, model_folder, model_vocab_size
from alloykit.vocab.chat import resolve_chat_template
from alloykit.vocab.remap import RowRemap
from alloykit.vocab.tensors import vocab_axis, vocab_tensors

LOG = logging.getLogger(__name__)


def rows_may_differ(ck, ref_ck, name: str, ref_name: str) -> bool:
    """Whether tensor ``name`` of ``ck`` and ``ref_name`` of ``ref_ck`` may differ in their
    number of rows: both token-indexed, equal in every other dimension."""
    a, b = ck.info(name).shape, ref_ck.info(ref_name).shape
    axis = vocab_axis(name)
    if axis is None or len(a) != len(b) or len(a) <= axis:
        return False
    return all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis)


def plan_vocab(recipe: Recipe, jobs: list, checkpoints: list, labels: list[str], head: int, resolve) -> VocabPlan:
    """Build the output vocabulary and set ``vocab`` (a RowRemap) and the output shape on
    every job that merges a token-indexed tensor."""
    referenced: list[int] = []
    for job in jobs:
        for s in job.sources + ([job.base] if job.base is not None else []):
            if s.model not in referenced:
                referenced.append(s.model)
    base = resolve(recipe.base_model) if recipe.base_model else None
    order = sorted(referenced, key=lambda i: (i != head, i))  # the vocabulary's base first
    vocab = build_vocab(recipe, checkpoints, labels, order, base, resolve)
    LOG.info("output vocabulary (tokenizer source '%s'): %d tokens, %d rows", recipe.tokenizer_source_resolved,
             vocab.n_tokens, vocab.size)
    for m in order:
        missing = int((vocab.perms[m] < 0).sum())
        if missing:
            LOG.info("model '%s' lacks %d of its tokens: their rows come from the other models", labels[m], missing)
    for job in jobs:
        if job.copy:
            continue
        models = [s.model for s in job.sources] + ([job.base.model] if job.base is not None else [])
        names = {}
        for s in job.sources + ([job.base] if job.base is not None else []):
            ck = checkpoints[s.model]
            info = ck.info(s.tensor)
            names.update({(s.model, n): a for n, a in vocab_tensors([s.tensor], {s.tensor: info.shape},
                                                                       model_vocab_size(ck)).items()})
        if not names:
            continue
        if len(names) != len(models):
            odd = [labels[m] for m in models if not any(k[0] == m for k in names)]
            raise PlanError(f"tensor '{job.name}': its rows match the vocabulary of some models but not of "
                            f"{', '.join(odd)} (config vocab_size differs from the tensor's rows); fix their config.json")
        axis = next(iter(names.values()))
        job_base = job.base.model if job.base is not None else base
        job.vocab = RowRemap(vocab, models, labels, axis=axis, base=job_base)
        shape = list(job.shape)
        shape[axis] = vocab.size
        job.shape = tuple(shape)
    return vocab


def plan_chat_template(recipe: Recipe, checkpoints: list, labels: list[str], resolve) -> str | None:
    """The recipe's ``chat_template`` as Jinja text (None: keep the tokenizer's own)."""
    if recipe.chat_template is None:
        return None
    refs = ([recipe.base_model] if recipe.base_model else []) + [m.model for m in recipe.models or []]
    refs += [s.model for sl in recipe.slices or [] for s in sl.sources]
    folders = {}
    for ref in dict.fromkeys(refs):
        folders[ref] = model_folder(checkpoints[resolve(ref)])
    return resolve_chat_template(recipe.chat_template, folders)
