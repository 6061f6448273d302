"""Task heads: what turns a model's output into one task's class logits.

Only the model's body is merged; each task keeps its head, as in the task-arithmetic and
TIES papers. A head is one of:

* the model's **own head**: a sequence-classification folder's classifier (after a merge of
  fine-tunes of one task, the merged classifier);
* **another folder's head**: the classifier of a fine-tuned sequence-classification folder
  (e.g. the fine-tune of that task), run on the evaluated model's body. The head folder's
  own model class does the forward pass (BERT's pooler and classifier, RoBERTa's
  two-layer head on ``<s>``, Llama's score of the last non-padding token), with its body
  replaced by the evaluated model's (:func:`graft`);
* a **linear head** on pooled hidden states (``mean`` over the real tokens, or ``cls``, the
  first token) of an encoder, read from a ``heads.safetensors`` file holding
  ``TASK.weight`` [classes, hidden] and ``TASK.bias`` [classes] (the quality benchmark
  writes one beside each fine-tune);
* for a causal LM, no head: the next-token distribution.

:class:`TaskNet` bundles a head with the module that runs it and the map from that
module's parameter names to the evaluated model's tensor names, so that one task can be
scored with the model's own weights or, functionally, with any state dict keyed like the
model's checkpoint (a merge candidate in a search).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from alloykit.errors import AlloyError
from alloykit.eval.loading import LoadedModel, ModelFolder, load_model, model_folder

HEADS_FILE = "heads.safetensors"


class HeadError(AlloyError):
    """A task head is missing or does not fit the model."""


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``mean``: average over the real tokens; ``cls``: the first token's hidden state."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def linear_heads(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.nn.Linear]:
    """The heads of a ``heads.safetensors`` file (all, or ``keys``), frozen, float32."""
    p = Path(path)
    if not p.is_file():
        raise HeadError(f"head file '{path}' does not exist; give a {HEADS_FILE} (TASK.weight, TASK.bias) or a "
                        "fine-tuned sequence-classification folder")
    try:
        sd = load_file(p)
    except Exception as err:  # safetensors raises its own error types for a corrupt file
        raise HeadError(f"head file '{path}' is not a readable safetensors file ({err})") from None
    have = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight")})
    heads = {}
    for key in keys if keys is not None else have:
        if f"{key}.weight" not in sd:
            raise HeadError(f"head file '{path}' has no head '{key}' (heads: {', '.join(have) or 'none'}); "
                            "name one of them (head_key: in the task file, or --head-key)")
        w = sd[f"{key}.weight"].float()
        b = sd.get(f"{key}.bias", torch.zeros(w.shape[0])).float()
        if w.dim() != 2 or b.shape != (w.shape[0],):
            raise HeadError(f"head file '{path}': head '{key}' has weight {list(w.shape)} and bias {list(b.shape)}; "
                            "need [classes, hidden] and [classes]")
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
        heads[key] = head.eval().requires_grad_(False)  # heads are not merged: gradients go to the body only
    return heads


def graft(head_model: torch.nn.Module, body: LoadedModel) -> tuple[torch.nn.Module, dict[str, str]]:
    """A copy of ``head_model`` (a sequence-classification model) whose body is ``body``'s, shared
    (not copied): running it runs ``body``'s modules, so hooks and gradients reach them. Returns
    the grafted module and its map from parameter names to ``body``'s checkpoint names (the
    head's own parameters are not in the map)."""
    prefix = head_model.base_model_prefix
    own = body.module
    if body.missing:
        raise HeadError(f"model '{body.folder.given}' has no '{body.missing[0]}' (its checkpoint lacks it), which the "
                        f"head of {type(head_model).__name__} reads; give a model folder that holds it")
    target = getattr(own, own.base_model_prefix, own) if body.family == "sequence-classification" else own
    if type(target) is not type(getattr(head_model, prefix)):
        raise HeadError(f"head of {type(head_model).__name__} needs a {type(getattr(head_model, prefix)).__name__} body; "
                        f"model '{body.folder.given}' has {type(target).__name__}")
    grafted = copy.copy(head_model)  # a shallow copy: the head's modules, the body swapped below
    grafted._modules = dict(head_model._modules)
    grafted._modules[prefix] = target
    body_path = {id(p): n for n, p in [*own.named_parameters(), *own.named_buffers()]}
    names = {}
    for n, p in [*grafted.named_parameters(), *grafted.named_buffers()]:
        own_name = body_path.get(id(p))
        if own_name is not None and own_name in body.names:
            names[n] = body.names[own_name]
    for n, p in grafted.named_parameters():
        if n not in names:
            p.requires_grad_(False)
    return grafted, names


@dataclass
class TaskNet:
    """One task's scorer: ``module`` runs the text, ``names`` maps its parameter names to the
    evaluated model's tensor names, ``head`` turns the module's output into logits.

    ``kind`` is ``classifier`` (logits [B, classes]), ``next-token`` (logits [B, T, vocab]) or
    ``body`` (no head: hidden states, for statistics that need no head).
    ``classes`` is the head's number of outputs (classifiers), ``describe`` says where the
    head came from (recorded in outputs), ``id2label`` the class names of a sequence-
    classification head (None for a linear head: its classes are the task's, in order).
    """

    module: torch.nn.Module
    names: dict[str, str]
    head: Callable[[object, torch.Tensor], torch.Tensor]
    kind: str
    classes: int
    describe: str
    id2label: dict[int, str] | None = None

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the batch with the module's own weights, or with ``params`` (keyed like the model's
        checkpoint; tensors it does not give keep the module's values)."""
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if params is None:
            out = self.module(**kwargs)
        else:
            mapped = {n: params[c] for n, c in self.names.items() if c in params}
            out = torch.func.functional_call(self.module, mapped, (), kwargs, strict=False)
        return self.head(out, mask)


def _own_logits(out, mask):
    return out.logits


def own_net(model: LoadedModel) -> TaskNet:
    """The sequence-classification model's own head (or a causal LM's next-token logits)."""
    if model.family == "causal-lm":
        return TaskNet(model.module, model.names, _own_logits, "next-token", int(model.module.config.vocab_size),
                       "next-token distribution")
    if model.family != "sequence-classification":
        raise HeadError(f"model '{model.folder.given}' is an encoder ({model.folder.architecture}): it has no head of "
                        f"its own; name one ('head:' in the task file, or --head: a {HEADS_FILE} or a fine-tuned "
                        "sequence-classification folder)")
    cfg = model.module.config
    return TaskNet(model.module, model.names, _own_logits, "classifier", int(cfg.num_labels),
                   f"own head of {model.folder.given}", _id2label(cfg))


def body_net(model: LoadedModel) -> TaskNet:
    """No head: the body's output only (what Grams need: every linear layer of the body runs)."""
    return TaskNet(model.module, model.names, lambda out, mask: out.last_hidden_state, "body", 0, "no head (body only)")


def linear_net(model: LoadedModel, head: torch.nn.Linear, pooling: str, describe: str) -> TaskNet:
    """A linear head on the encoder's pooled hidden states."""
    if model.family != "encoder":
        raise HeadError(f"a linear head ({describe}) reads an encoder's hidden states; model '{model.folder.given}' "
                        f"is {model.family} ({model.folder.architecture}): pass --model-class encoder")
    hidden = int(model.module.config.hidden_size)
    if head.in_features != hidden:
        raise HeadError(f"head {describe} reads {head.in_features} features; model '{model.folder.given}' has hidden "
                        f"size {hidden}")

    def apply(out, mask):
        return head(pool(out.last_hidden_state, mask, pooling))

    return TaskNet(model.module, model.names, apply, "classifier", head.out_features, f"{describe}, {pooling} pooling")


def folder_net(model: LoadedModel, head_folder: ModelFolder) -> TaskNet:
    """The classifier of the sequence-classification folder ``head_folder`` on ``model``'s body."""
    if head_folder.family != "sequence-classification":
        raise HeadError(f"head folder '{head_folder.given}' holds a {head_folder.architecture}, not a sequence-"
                        f"classification model; give a fine-tuned *ForSequenceClassification folder or a {HEADS_FILE}")
    head_model = load_model(head_folder).module
    grafted, names = graft(head_model, model)
    cfg = head_model.config
    return TaskNet(grafted, names, _own_logits, "classifier", int(cfg.num_labels), f"head of {head_folder.given}",
                   _id2label(cfg))


def head_net(model: LoadedModel, head: str | None, *, key: str, pooling: str) -> TaskNet:
    """The TaskNet for ``head``: None or the model's own folder (its own head), another folder, or a
    heads file (key ``key``)."""
    if head is None:
        return own_net(model)
    p = Path(head)
    if p.is_dir():
        folder = model_folder(p, what="head folder")
        if folder.path.resolve() == model.folder.path.resolve():
            return own_net(model)  # the model's own head, named by its folder
        return folder_net(model, folder)
    lin = linear_heads(p, [key])[key]
    return linear_net(model, lin, pooling, f"{p}[{key}]")


def _id2label(cfg) -> dict[int, str]:
    return {int(k): str(v) for k, v in (getattr(cfg, "id2label", None) or {}).items()}


def named_classes(id2label: dict[int, str] | None) -> bool:
    """Whether a head's classes have names (config.json's id2label), not transformers' LABEL_0, LABEL_1..."""
    return bool(id2label) and not all(v == f"LABEL_{k}" for k, v in id2label.items())
