"""Merge methods, one module per family. Importing this package registers them all."""

from alloykit.methods.registry import MergeInput, MethodSpec, Params, all_methods, get_method, register

# Families register at import time.
from alloykit.methods import basic, emr, geometric, interference, selective, sparse, subspace, weighted  # noqa: E402,F401

__all__ = ["MergeInput", "MethodSpec", "Params", "all_methods", "get_method", "register"]
