"""alloykit: streaming, verified model merging.

This module is the package's composition root. It names the public API, whose modules
load on first use (PEP 562), so that ``import alloykit`` and light commands such as
``alloykit --help`` start without importing torch; and it wires the features that plug
into the core (planning steps, ``alloykit.plan.steps``) without the core importing them.
"""

from __future__ import annotations

import importlib
import sys
import types

from alloykit.plan.steps import register_merge_step, register_plan_step

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "AlloyError": "alloykit.errors",
    "Recipe": "alloykit.config",
    "load_recipe": "alloykit.config",
    "parse_recipe": "alloykit.config",
    "merge": "alloykit.merge",
    "merge_state_dicts": "alloykit.merge",
    "plan_recipe": "alloykit.merge",
    "load_task_model": "alloykit.methods.emr",
    "build_moe": "alloykit.moe.build",
    "load_routed_model": "alloykit.moe.routed",
    "save_routed": "alloykit.moe.routed",
}

#: feature packages that are also callable: ``alloykit.align(...)`` runs ``alloykit.align.align``, while
#: ``alloykit.align.lmc`` and ``import alloykit.align as A`` still reach the package (so not in _API)
_CALLABLE_PACKAGES = {"align": "alloykit.align"}

__all__ = sorted([*_API, *_CALLABLE_PACKAGES, "__version__"])

# data-dependent methods (``needs_stats``) read each model's statistics: attached at plan time
register_plan_step("stats", "alloykit.stats.attach:attach_stats_step", applies=lambda spec: spec.needs_stats is not None,
                   replace=True)
# a recipe's ``align:`` (alloykit extension): align the inputs to base_model, merge the aligned copies, REPAIR
register_merge_step("align", "alloykit.align.step:merge_aligned", replace=True)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(_CALLABLE_PACKAGES[name])
    raise AttributeError(f"module 'alloykit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_CALLABLE_PACKAGES))


class _Package(types.ModuleType):
    """``alloykit.merge`` is the function, although a submodule has that name too: when the
    import system binds the submodule on the package, the function is bound instead (the
    module stays reachable as ``sys.modules['alloykit.merge']`` and ``from alloykit.merge import``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _API.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
