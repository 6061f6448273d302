"""``alloykit tokensurgeon``: a model with a donor's tokenizer, written like a merge's output.

The transplant is a one-model passthrough plan whose embedding and output-head jobs build
the donor-vocabulary rows (``alloykit.vocab.surgeon``), so it streams tensor by tensor and
goes through the merge's output path: atomic folder, recipe, manifest, model card.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloykit.io.checkpoint import Checkpoint
from alloykit.output.model import WriteOptions, write_model
from alloykit.plan.planner import make_plan
from alloykit.vocab.surgeon import attach_surgery


def tokensurgeon(model: str | os.PathLike, donor: str | os.PathLike, out: str | os.PathLike, *, method: str = "omp",
                 k: int = 64, overwrite: bool = False, progress: bool = True, allow_pickle: bool = False) -> Path:
    """Write ``model`` with ``donor``'s tokenizer into ``out``; returns the output folder.

    ``method``: how the rows of tokens the model lacks are built: ``omp`` (the default, as
    mergekit-tokensurgeon's: orthogonal matching pursuit with ``k`` shared tokens, reading
    the donor's weights; measured far closer to the true rows than ``pieces``, see
    docs/tokenizers.md), ``pieces`` (the mean of the rows of the pieces the model's
    tokenizer splits the token into; ignores the donor's weights) or ``mean``.
    """
    what = f"{method}, k={k}" if method == "omp" else method
    recipe = {"merge_method": "passthrough", "models": [{"model": str(model)}],
              "name": f"{Path(model).name} with the tokenizer of {Path(donor).name} (alloykit tokensurgeon, {what})"}
    plan = make_plan(recipe, allow_pickle=allow_pickle)
    try:
        donor_ck = Checkpoint(donor, allow_pickle=allow_pickle, label=str(donor))
        plan.checkpoints.append(donor_ck)
        plan.labels.append(f"{donor} (tokenizer donor)")
        attach_surgery(plan, donor_ck, str(donor), method=method, k=k)
        return write_model(plan, out, WriteOptions(overwrite=overwrite, progress=progress)).path
    finally:
        plan.close()
