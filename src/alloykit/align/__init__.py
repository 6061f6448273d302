"""Before merging: permutation alignment, linear mode connectivity, REPAIR.

``alloykit.align(model, to, out)`` permutes a model's hidden units to match a reference
(weight matching or activation matching, Git Re-Basin); ``alloykit.align.lmc`` measures
loss and accuracy along the linear path between two models; ``alloykit.align.repair``
restores an interpolated model's per-unit activation statistics (REPAIR).
"""

from __future__ import annotations

import sys
import types

from alloykit.align.api import Alignment, align, spec_for_module
from alloykit.align.families import hf_spec
from alloykit.align.spec import Group, HeadPerm, Heads, Spec, Use, apply_permutations
from alloykit.align.step import merge_aligned  # the recipe step 'align:' (wired in alloykit/__init__.py)
from alloykit.align.trace import module_spec

__all__ = ["Alignment", "Group", "HeadPerm", "Heads", "Spec", "Use", "align", "apply_permutations", "hf_spec",
           "merge_aligned", "module_spec", "spec_for_module"]


class _CallableModule(types.ModuleType):
    """``alloykit.align(...)`` calls :func:`align` while ``alloykit.align.lmc`` etc. stay submodules."""

    def __call__(self, *args, **kwargs):
        return align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
