"""Planning steps: how a feature completes a plan without the planner knowing the feature.

``make_plan`` builds one job per output tensor, then runs, in registration order, every
registered step whose ``applies(method)`` is true. A step is ``fn(builder) -> None`` and
works through the public ``PlanBuilder`` API (``alloykit.plan.planner``): it reads the
recipe, the method and the jobs, may open more inputs (``builder.add_checkpoint``) and
fill in the jobs' fields. It raises an ``AlloyError`` for a problem, like the planner.

The statistics of data-dependent methods are such a step (``alloykit.stats.attach``).
The plan layer never imports a feature: built-in steps are declared in the package's
composition root (``alloykit/__init__.py``) as ``"module:function"`` references, which
are imported the first time a plan needs them (so ``alloykit --help`` imports none).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ``fn(builder: PlanBuilder) -> None``
StepFunction = Callable[[Any], None]


@dataclass
class PlanStep:
    name: str
    #: does the step apply to a plan of this method (a ``MethodSpec``)?
    applies: Callable[[Any], bool]
    #: the step, or ``"module:function"`` to import when first needed
    target: StepFunction | str

    def function(self) -> StepFunction:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target


_STEPS: dict[str, PlanStep] = {}


def register_plan_step(name: str, step: StepFunction | str, *, applies: Callable[[Any], bool],
                       replace: bool = False) -> None:
    """Run ``step`` on every plan whose method satisfies ``applies`` (after the jobs are built)."""
    if name in _STEPS and not replace:
        raise ValueError(f"planning step {name!r} registered twice (pass replace=True to swap it)")
    _STEPS[name] = PlanStep(name, applies, step)


def unregister_plan_step(name: str) -> None:
    _STEPS.pop(name, None)


def plan_steps() -> list[PlanStep]:
    """The registered steps, in the order they run."""
    return list(_STEPS.values())


# -- steps around a whole merge -------------------------------------------------------------
#: name -> a step that runs a whole merge its own way when the recipe asks for it, e.g. ``align``
#: (align the inputs to base_model, merge the aligned copies, REPAIR: ``alloykit.align.step``);
#: ``fn(request, out_dir, options: WriteOptions) -> Written``, called by ``alloykit.merge.run_merge``
_MERGE_STEPS: dict[str, PlanStep] = {}


def register_merge_step(name: str, step: Callable[..., Any] | str, *, replace: bool = False) -> None:
    """Let ``alloykit.merge`` hand a recipe that asks for ``name`` to ``step`` (``"module:function"``: imported when first used)."""
    if name in _MERGE_STEPS and not replace:
        raise ValueError(f"merge step {name!r} registered twice (pass replace=True to swap it)")
    _MERGE_STEPS[name] = PlanStep(name, lambda spec: True, step)


def merge_step(name: str) -> Callable[..., Any]:
    try:
        return _MERGE_STEPS[name].function()
    except KeyError:
        raise KeyError(f"no merge step {name!r} is registered (alloykit/__init__.py wires the built-in ones)") from None
