"""Mixtures of experts and routed merges.

* ``alloykit moe CONFIG OUT`` (:mod:`~alloykit.moe.build`): mergekit-moe's configuration, a
  Mixtral / Qwen MoE model folder out (dense experts' MLPs behind the base's attention,
  routers from prompts or random);
* routed merges for the Python API (:mod:`~alloykit.moe.routed`): experts kept apart and
  chosen per input (SMILE, WEMoE, ...), saved as safetensors plus a small JSON config that
  :func:`~alloykit.moe.routed.load_routed_model` rebuilds.
"""
