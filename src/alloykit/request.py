"""A merge request: the recipe, parsed and validated once, with where its relative paths start.

Every entry point (``alloykit.merge``, ``merge_state_dicts``, ``plan_recipe``, the CLI's
merge/plan/validate, ``merge --output-lora``, ``extract-lora``) turns what it was given
into one ``MergeRequest`` here, and plans it through ``MergeRequest.plan``: the recipe is
read once, ``recipe_dir`` is worked out in one place, and the planner's resolver is the
only code that resolves parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alloykit.config import Recipe, load_recipe, parse_recipe
from alloykit.plan.planner import Plan, make_plan


@dataclass(frozen=True)
class MergeRequest:
    recipe: Recipe
    #: relative model paths are looked up from the working directory, then from here
    recipe_dir: Path | None = None
    #: the CLI's --seed / merge(seed=...): overrides the recipe's ``seed``
    seed: int | None = None
    allow_pickle: bool = False

    @classmethod
    def of(
        cls,
        recipe: Recipe | dict | str | os.PathLike | "MergeRequest",
        *,
        recipe_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        allow_pickle: bool = False,
    ) -> "MergeRequest":
        """A request from a recipe object, a dict, or a YAML path (whose folder is then the
        ``recipe_dir`` unless one is given)."""
        if isinstance(recipe, MergeRequest):
            return recipe
        if isinstance(recipe, (str, os.PathLike)):
            path = Path(recipe)
            parsed = load_recipe(path)
            recipe_dir = recipe_dir if recipe_dir is not None else path.parent
        else:
            parsed = parse_recipe(recipe)
        return cls(parsed, Path(recipe_dir) if recipe_dir is not None else None, seed, allow_pickle)

    def with_out_dtype(self, dtype: str | None) -> "MergeRequest":
        """The same request with the output dtype overridden (``--dtype``; float32 for adapters)."""
        if dtype is None:
            return self
        return replace(self, recipe=self.recipe.model_copy(update={"out_dtype": dtype}))

    def plan(self, *, preloaded: dict[str, Any] | None = None, preloaded_stats: dict[str, Any] | None = None) -> Plan:
        """Validate against the inputs' headers and emit every tensor job (reads headers only)."""
        return make_plan(self.recipe, recipe_dir=self.recipe_dir, allow_pickle=self.allow_pickle, seed=self.seed,
                         preloaded=preloaded, preloaded_stats=preloaded_stats)
