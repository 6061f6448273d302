"""Observing hidden units on calibration data: forward hooks (Hugging Face models) or a
recording torch.fx interpreter (traced modules), and streaming correlation statistics.

A batch is either a dict of keyword inputs with an ``attention_mask`` (token models: only
real tokens are observed, padding is dropped) or a tensor (plain modules).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from alloykit.align.spec import Probe, Spec


def features(x: torch.Tensor, cdim: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One observed tensor as [rows, units]: the unit axis last, padding tokens dropped."""
    x = x.detach()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape) and cdim in (-1, 2):
        return x[mask.bool()].double()
    x = x.movedim(cdim, -1)
    return x.reshape(-1, x.shape[-1]).double()


class Observer:
    """Runs a model on batches and returns the probed features of each pass."""

    def __init__(self, module: torch.nn.Module, probes: Iterable[Probe]):
        self.module = module
        self.probes = list(dict.fromkeys(probes))
        self.traced = any(p.where == "node" for p in self.probes)
        self.gm = torch.fx.symbolic_trace(module) if self.traced else None

    def run(self, batch: Any) -> tuple[dict[Probe, torch.Tensor], Any]:
        """(features of every probe, the model's output) for one batch."""
        if self.traced:
            return self._run_traced(batch)
        return self._run_hooked(batch)

    def _run_traced(self, batch: torch.Tensor) -> tuple[dict[Probe, torch.Tensor], Any]:
        wanted = {p.target: p for p in self.probes}
        seen: dict[Probe, torch.Tensor] = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in wanted:
                    p = wanted[n.name]
                    seen[p] = features(out, p.cdim, None)
                return out

        args = batch if isinstance(batch, tuple) else (batch,)
        with torch.no_grad():
            out = Recorder(self.gm).run(*args)
        return seen, out

    def _run_hooked(self, batch: dict) -> tuple[dict[Probe, torch.Tensor], Any]:
        modules = dict(self.module.named_modules())
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        seen: dict[Probe, torch.Tensor] = {}
        handles = []
        for p in self.probes:
            mod = modules[p.target]
            if p.where == "in":
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, p=p: seen.__setitem__(p, features(args[0], p.cdim, mask))))
            else:
                handles.append(mod.register_forward_hook(
                    lambda m, args, out, p=p: seen.__setitem__(p, features(out, p.cdim, mask))))
        try:
            with torch.no_grad():
                out = self.module(**batch) if isinstance(batch, dict) else self.module(batch)
        finally:
            for h in handles:
                h.remove()
        return seen, out


class CrossStats:
    """Running sums for the correlation of two feature sets observed on the same rows."""

    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.sa is None:
            self.sa, self.sb = a.sum(0), b.sum(0)
            self.saa, self.sbb = (a * a).sum(0), (b * b).sum(0)
            self.sab = a.T @ b
        else:
            self.sa += a.sum(0)
            self.sb += b.sum(0)
            self.saa += (a * a).sum(0)
            self.sbb += (b * b).sum(0)
            self.sab += a.T @ b
        self.n += a.shape[0]

    def corr(self) -> torch.Tensor:
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        sa = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        return cov / (sa[:, None] * sb[None, :] + 1e-12)


def correlations(spec: Spec, ref: torch.nn.Module, model: torch.nn.Module,
                 batches: Iterable[Any]) -> dict[tuple[str, str], torch.Tensor]:
    """(group, role) -> [ref units, model units] correlation, averaged over the group's probes."""
    probes = [p for g in spec.groups for p in g.probes]
    obs_ref, obs_model = Observer(ref, probes), Observer(model, probes)
    stats: dict[Probe, CrossStats] = {}
    for batch in batches:
        fa, _ = obs_ref.run(batch)
        fb, _ = obs_model.run(batch)
        for p in fa:
            stats.setdefault(p, CrossStats()).add(fa[p], fb[p])
    sums: dict[tuple[str, str], list[torch.Tensor]] = {}
    for g in spec.groups:
        for p in g.probes:
            if p in stats:
                sums.setdefault((g.name, p.role), []).append(stats[p].corr())
    return {key: torch.stack(cs).mean(0) for key, cs in sums.items()}
