"""alloykit: streaming, verified model merging."""

__version__ = "0.1.0"

from alloykit.config import Recipe, load_recipe, parse_recipe  # noqa: E402
from alloykit.errors import AlloyError  # noqa: E402
from alloykit.merge import merge, merge_state_dicts, plan_recipe  # noqa: E402
from alloykit.methods.emr import load_task_model  # noqa: E402
import alloykit.align  # noqa: E402,F401  (alloykit.align(...); registers the recipe step 'align:')

__all__ = ["AlloyError", "Recipe", "align", "load_recipe", "load_task_model", "merge", "merge_state_dicts", "parse_recipe", "plan_recipe", "__version__"]
