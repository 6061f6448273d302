"""What the search commands read: the base and the fine-tunes, checked to share one layout, and
their task vectors.

Models are any family :mod:`alloykit.eval.loading` reads (encoders, the quality
benchmark's fine-tune folders holding ``encoder/`` and ``heads.safetensors``,
sequence-classification models, causal LMs); tasks and heads come from
:class:`alloykit.eval.suite.TaskSuite`.
"""

from __future__ import annotations

from collections.abc import Sequence

from alloykit.errors import AlloyError, CheckpointError, PlanError
from alloykit.eval.loading import LoadedModel, ModelFolder, model_folder
from alloykit.io.checkpoint import Checkpoint
from alloykit.search.adamerging import TaskVectorModel


def _layout_hint(name: str, other: Checkpoint) -> str:
    """' (the base names it X: ...)' when ``name`` differs from a tensor of ``other`` only by a prefix."""
    for cand in other.tensors:
        if name.endswith("." + cand) or cand.endswith("." + name):
            return (f" (it names it '{cand}': one is a bare body, the other a model with a head, such as BertModel "
                    "and BertForSequenceClassification; give folders of one model class)")
    return ""


def checked_pair(base: str | None, models: Sequence[str], family: str | None = None
                 ) -> tuple[ModelFolder, list[ModelFolder], Checkpoint, list[Checkpoint]]:
    """Resolve the base (None: the first model stands in, for its architecture) and the models;
    every model must have the base's tensors with the base's shapes."""
    if not models:
        raise AlloyError("no models given; list the fine-tuned models after --models")
    base_folder = model_folder(base if base is not None else models[0], family, what="base" if base else "model")
    folders = [model_folder(m, family) for m in models]
    base_ck = Checkpoint(base_folder.path, label=base_folder.given)
    cks = [Checkpoint(f.path, label=f.given) for f in folders]
    for ck in cks:
        for name, info in base_ck.tensors.items():
            if name not in ck and not info.dtype.is_floating_point:
                continue  # integer buffers (BERT position_ids) are copied from the base, as merge does
            if name not in ck:
                raise PlanError(f"model '{ck.label}': has no tensor '{name}' (the base has it){_layout_hint(name, ck)}; "
                                "the models must share the base's architecture")
            if tuple(ck.info(name).shape) != tuple(info.shape):
                raise PlanError(f"model '{ck.label}': tensor '{name}' has shape {list(ck.info(name).shape)}, the base "
                                f"{list(info.shape)}; the models must share the base's architecture")
        extra = sorted(set(ck.tensors) - set(base_ck.tensors))
        if extra:
            raise PlanError(f"model '{ck.label}': tensor '{extra[0]}' is not in the base{_layout_hint(extra[0], base_ck)}; "
                            "the models must share the base's architecture")
    return base_folder, folders, base_ck, cks


def task_vectors(model: LoadedModel, base_ck: Checkpoint, cks: Sequence[Checkpoint]) -> TaskVectorModel:
    """Task vectors of the base module's parameters, keyed like the checkpoints (theta_0 is the
    module's own tensors, not a copy)."""
    params = {model.names[n]: p for n, p in model.module.named_parameters() if n in model.names}
    missing = sorted(set(n for n, _ in model.module.named_parameters()) - set(model.names))
    if missing:
        raise CheckpointError(f"model '{base_ck.label}': parameter '{missing[0]}' of its {type(model.module).__name__} "
                              "is not a tensor of the checkpoint; save the model with save_pretrained")
    model.module.requires_grad_(False)
    return TaskVectorModel({n: p.detach() for n, p in params.items()}, [ck.read for ck in cks])
