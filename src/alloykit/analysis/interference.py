"""Interference between task vectors (tau_i = theta_i - theta_base), read tensor by tensor.

Only one tensor of each model is in memory at a time: every statistic is a sum over
tensors (dot products, counts, magnitudes), accumulated per layer and for the model.

* cosine: tau_i . tau_j / (|tau_i| |tau_j|), whole model and per layer;
* sign conflict: the fraction of parameters where two task vectors have opposite
  signs (pairwise), and where any two of the K do (all models, per layer);
* TIES at ``density``: each task vector trimmed to its largest magnitudes per tensor
  (``alloykit.ops.sparsify.magnitude_mask``, the trim of alloykit's ``ties``); reported:
  the fraction of entries trimmed, the fraction of each task vector's squared norm
  trimmed, and the fraction of kept entries the sign election (sign of the summed
  trimmed deltas, ``consensus_method: sum``) then discards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError, PlanError
from alloykit.io.checkpoint import Checkpoint
from alloykit.ops.sparsify import magnitude_mask
from alloykit.roles import role_of

CHUNK = 1 << 20


def layer_of(name: str) -> str:
    """Group of a tensor: ``layer N`` for the repeated blocks, ``embeddings`` for what comes
    before them (the tables and their norm), else ``other`` (final norm, heads)."""
    role = role_of(name)
    if role.layer is not None:
        return f"layer {role.layer}"
    return "embeddings" if role.section == "pre" else "other"


def _sort_key(group: str) -> tuple[int, int]:
    if group == "embeddings":
        return (0, 0)
    if group.startswith("layer "):
        return (1, int(group.split()[1]))
    return (2, 0)


@dataclass
class _Acc:
    """Sums over the tensors of one group (K task vectors)."""

    k: int
    params: int = 0
    gram: torch.Tensor = field(default=None)  # [K, K] float64 dot products
    pair_conflicts: torch.Tensor = field(default=None)  # [K, K] int64 counts of opposite signs
    any_conflict: int = 0
    abs_sum: torch.Tensor = field(default=None)  # [K] sum |tau|
    conflict_abs_sum: float = 0.0  # sum over conflicting entries of mean_k |tau_k|
    trimmed: int = 0  # entries zeroed by the trim, summed over the K models
    trimmed_sq: torch.Tensor = field(default=None)  # [K] squared norm removed by the trim
    kept: int = 0  # entries kept by the trim, summed over the models
    elected_out: int = 0  # kept entries whose sign loses the election

    def __post_init__(self) -> None:
        k = self.k
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.pair_conflicts = torch.zeros(k, k, dtype=torch.int64)
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.trimmed_sq = torch.zeros(k, dtype=torch.float64)

    def add(self, deltas: torch.Tensor, density: float) -> None:
        """``deltas``: [K, n] float32 task vectors of one tensor."""
        k, n = deltas.shape
        self.params += n
        # the trim ranks magnitudes over the whole tensor; the sums below go by chunks
        # (float64 temporaries of a few MB, and exact counts for tensors of any size)
        keep = torch.stack([magnitude_mask(deltas[i], density) for i in range(k)])
        for lo in range(0, n, CHUNK):
            self._add_chunk(deltas[:, lo:lo + CHUNK].double(), keep[:, lo:lo + CHUNK])

    def _add_chunk(self, d: torch.Tensor, keep: torch.Tensor) -> None:
        self.gram += d @ d.T
        pos, neg = (d > 0).double(), (d < 0).double()
        self.pair_conflicts += (pos @ neg.T + neg @ pos.T).round().to(torch.int64)
        conflict = (d > 0).any(0) & (d < 0).any(0)
        self.any_conflict += int(conflict.sum())
        absd = d.abs()
        self.abs_sum += absd.sum(1)
        if bool(conflict.any()):
            self.conflict_abs_sum += float(absd[:, conflict].mean(0).sum())
        trimmed = d * keep
        self.trimmed += int((~keep).sum())
        self.kept += int(keep.sum())
        self.trimmed_sq += (d.pow(2) * (~keep)).sum(1)
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)  # a zero sum elects +, as mergekit
        self.elected_out += int((keep & (trimmed * elected < 0)).sum())

    def report(self) -> dict[str, Any]:
        norms = self.gram.diagonal().clamp_min(0).sqrt()
        denom = norms.unsqueeze(0) * norms.unsqueeze(1)
        cos = torch.where(denom > 0, self.gram / denom.clamp_min(1e-300), torch.zeros_like(self.gram))
        n = max(self.params, 1)
        sq = self.gram.diagonal()
        return {
            "params": self.params,
            "norms": [float(x) for x in norms],
            "cosine": [[float(x) for x in row] for row in cos],
            "sign_conflict_pairwise": [[float(x) / n for x in row] for row in self.pair_conflicts],
            "sign_conflict_rate": self.any_conflict / n,
            "mean_abs": [float(x) / n for x in self.abs_sum],
            "conflict_mean_abs": self.conflict_abs_sum / max(self.any_conflict, 1),
            "ties_trimmed_fraction": self.trimmed / (n * self.k),
            "ties_trimmed_energy": [float(r / s) if s > 0 else 0.0 for r, s in zip(self.trimmed_sq, sq)],
            "ties_elected_out_fraction": self.elected_out / max(self.kept, 1),
        }


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _path_parts(model: str | os.PathLike) -> list[str]:
    """A model path's components, for labels: a Hugging Face cache snapshot
    (``models--org--name/snapshots/REV``) reads as ``org/name``, a weights file by its stem."""
    parts = list(Path(os.path.abspath(os.fspath(model))).parts[1:])
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            parts = parts[:i] + [part.removeprefix("models--").replace("--", "/")]
            break
    if parts and parts[-1].endswith(_WEIGHT_SUFFIXES):
        parts[-1] = parts[-1].rsplit(".", 1)[0]
    return parts


def short_labels(models: Sequence[str | os.PathLike]) -> list[str]:
    """Unique short labels: each model's shortest path suffix that no other model's path ends
    with (``runs/cola/encoder``, ``runs/sst2/encoder`` -> ``cola/encoder``, ``sst2/encoder``;
    ``checkpoint-500`` folders likewise); a path given twice gets ``#2``."""
    parts = [_path_parts(m) for m in models]
    labels = []
    for i, p in enumerate(parts):
        k = next((k for k in range(1, len(p) + 1) if all(q[-k:] != p[-k:] for q in parts if q != p)), len(p))
        labels.append("/".join(p[-k:]) or str(models[i]))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    return labels


def analyze(models: Sequence[str | os.PathLike], base: str | os.PathLike, *, density: float = 0.2,
            names: Sequence[str] | None = None, allow_pickle: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Interference report of the task vectors of ``models`` against ``base`` (JSON-serialisable)."""
    if len(models) < 1:
        raise PlanError("analyze needs at least one model besides the base")
    if not 0.0 <= density <= 1.0:
        raise PlanError(f"--density {density}: must be in [0, 1]")
    names = list(names) if names else short_labels(models)
    if len(names) != len(models):
        raise PlanError(f"--names has {len(names)} entries for {len(models)} models")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise PlanError(f"--names: '{twice}' is given twice; give each model its own name")
    base_ck = Checkpoint(base, allow_pickle=allow_pickle, label=str(base))
    cks = [Checkpoint(m, allow_pickle=allow_pickle, label=str(m)) for m in models]
    try:
        work = [n for n, info in sorted(base_ck.tensors.items()) if info.dtype.is_floating_point]
        for ck in cks:  # all validation before the first tensor is read
            for n in work:
                if n not in ck:
                    raise CheckpointError(f"model '{ck.label}': has no tensor '{n}' (the base has it); "
                                          "analyze task vectors of fine-tunes of this base")
                if tuple(ck.info(n).shape) != tuple(base_ck.info(n).shape):
                    raise PlanError(f"tensor '{n}': shape {tuple(ck.info(n).shape)} in '{ck.label}' but "
                                    f"{tuple(base_ck.info(n).shape)} in the base")
        k = len(cks)
        total, groups = _Acc(k), {}
        for i, n in enumerate(work):
            b = base_ck.read(n).to(torch.float32).reshape(-1)
            deltas = torch.stack([ck.read(n).to(torch.float32).reshape(-1) - b for ck in cks])
            if not bool(torch.isfinite(deltas).all()):
                raise CheckpointError(f"tensor '{n}': a task vector holds NaN or Inf; check the inputs")
            g = layer_of(n)
            groups.setdefault(g, _Acc(k)).add(deltas, density)
            total.add(deltas, density)
            if progress:
                progress(i + 1, len(work))
    finally:
        base_ck.close()
        for ck in cks:
            ck.close()
    return {"models": names, "base": str(base), "density": density, "tensors": len(work),
            "model": total.report(),
            "layers": [{"layer": g, **groups[g].report()} for g in sorted(groups, key=_sort_key)]}
