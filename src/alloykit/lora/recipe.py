"""merge-lora requests: the command's options or a ``--recipe`` file, as one typed object.

A merge-lora recipe (``alloykit search lorahub`` writes one) is YAML::

    merge_lora:
      base: path/to/base
      adapters: [path/to/a1, path/to/a2]
      method: lorahub          # cat (default), lorahub, svd, knots, or a task-vector method
      weights: [0.6, 0.4]      # one per adapter (methods with a per-model weight)
      rank: 16                 # the merged adapter's rank (all methods but cat and lorahub)
      density: 0.5             # shorthand for parameters: {density: 0.5}
      parameters: {...}        # the method's parameters, as in a merge recipe's top level
      seed: 0
      knots_merge: ties        # with method knots: the method that merges the aligned blocks
    lorahub: {...}             # optional: what the search recorded (not read)

It is read by the project's guarded YAML loader (``alloykit.config.load_yaml``: duplicate
keys and alias bombs refused), validated strictly (unknown keys refused with the allowed
set), and relative paths are looked up from the working directory, then from the
recipe's folder, as in a merge recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from alloykit.config import ParamDict, _Strict, explain, load_yaml
from alloykit.errors import RecipeError

EXACT_METHODS = ("cat", "lorahub")


class MergeLoraRecipe(_Strict):
    base: str
    adapters: list[str] = Field(min_length=1)
    method: str = "cat"
    weights: list[float] | None = None
    rank: int | None = Field(None, ge=1)
    density: float | None = None
    parameters: ParamDict | None = None
    seed: int = 0
    knots_merge: str = "ties"

    @model_validator(mode="after")
    def _consistent(self) -> "MergeLoraRecipe":
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"{len(self.weights)} weights for {len(self.adapters)} adapters; give one weight per adapter")
        if self.method not in EXACT_METHODS and self.rank is None:
            raise ValueError(f"method {self.method} truncates the merged update: give --rank (or 'rank'), "
                             "the rank of the merged adapter")
        return self

    def method_parameters(self) -> dict[str, Any]:
        """The method's shared parameters: ``parameters`` with ``density`` folded in."""
        out = dict(self.parameters or {})
        if self.density is not None:
            out["density"] = self.density
        return out


class MergeLoraDocument(_Strict):
    merge_lora: MergeLoraRecipe
    lorahub: dict[str, Any] | None = None


def merge_lora_request(data: dict[str, Any], subject: str = "merge-lora") -> MergeLoraRecipe:
    """Validate merge-lora options given as a dict; one ``RecipeError`` line per problem."""
    try:
        return MergeLoraRecipe.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as err:
        raise RecipeError(explain(err, MergeLoraRecipe).line(subject)) from None


def load_merge_lora_recipe(path: str | os.PathLike) -> tuple[MergeLoraRecipe, Path]:
    """A merge-lora recipe file -> (the validated request, the folder its relative paths start from)."""
    path = Path(path)
    data = load_yaml(path, what="merge-lora recipe")
    subject = f"--recipe {path}"
    if not isinstance(data, dict) or "merge_lora" not in data:
        raise RecipeError(f"{subject}: needs a 'merge_lora' mapping with 'base' and 'adapters'")
    try:
        return MergeLoraDocument.model_validate(data).merge_lora, path.parent
    except ValidationError as err:
        raise RecipeError(explain(err, MergeLoraDocument).line(subject)) from None


def resolve_path(ref: str, recipe_dir: Path | None) -> Path:
    """A recipe's path: from the working directory, else from the recipe's folder (as the planner does)."""
    p = Path(ref).expanduser()
    if not p.exists() and recipe_dir is not None and not p.is_absolute() and (recipe_dir / p).exists():
        return recipe_dir / p
    return p
