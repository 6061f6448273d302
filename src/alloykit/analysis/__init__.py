"""Analyses of checkpoints before merging them (task-vector interference)."""

from alloykit.analysis.interference import analyze, layer_of

__all__ = ["analyze", "layer_of"]
