"""Mixtures of experts and routed merges.

* ``alloykit moe CONFIG OUT`` (:mod:`~alloykit.moe.build`): mergekit-moe's configuration, a
  Mixtral / Qwen MoE model folder out (dense experts' MLPs behind the base's attention,
  routers from prompts or random);
* routed merges for the Python API (:mod:`~alloykit.moe.routing`): experts kept apart and
  chosen per input -- :func:`smile` (training-free), :func:`wemoe` (routers trained on
  unlabelled inputs) and :func:`twin_merging` (a shared merge plus low-rank exclusive parts,
  mixed per input by a router trained on task-labelled inputs, :mod:`~alloykit.moe.twin`) --
  saved by :func:`save_routed` as safetensors plus a small JSON config that
  :func:`load_routed_model` rebuilds (:mod:`~alloykit.moe.routed`).

The names load on first use, so importing the package (as the CLI does) imports no torch.
"""

from __future__ import annotations

import importlib

_API = {
    "build_moe": "alloykit.moe.build",
    "plan_moe": "alloykit.moe.build",
    "smile": "alloykit.moe.routing",
    "wemoe": "alloykit.moe.routing",
    "train_routers": "alloykit.moe.routing",
    "twin_merging": "alloykit.moe.twin",
    "train_router": "alloykit.moe.twin",
    "with_rank": "alloykit.moe.twin",
    "save_routed": "alloykit.moe.routed",
    "load_routed_model": "alloykit.moe.routed",
    "overhead": "alloykit.moe.routed",
    "parameter_count": "alloykit.moe.routed",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'alloykit.moe' has no attribute '{name}'")
