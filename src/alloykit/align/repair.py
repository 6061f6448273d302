"""REPAIR: restore an interpolated model's per-unit activation statistics.

Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted Activations
for Interpolation Repair", ICLR 2023 (arXiv:2211.08403). Averaging two aligned networks
shrinks the variance of their hidden units ("variance collapse": with correlation rho the
mid-point unit has variance (1 + rho) / 2 of the endpoints'), and the shrinkage compounds
with depth. REPAIR rescales every unit of the merged model so that its mean and standard
deviation on calibration data are the interpolation of the endpoints':

    mu_target = sum_k w_k mu_k,   sigma_target = sum_k w_k sigma_k
    y' = (y - mu_merged) * sigma_target / sigma_merged + mu_target

and folds that affine map into the layer that produces the unit (a Linear's or a
convolution's weight rows and bias, a norm's scale and shift), so the result is an
ordinary checkpoint. Layers are corrected in forward order, each measured after the
corrections upstream of it (the paper's exact variant).

Where: every producer named by the spec (:attr:`~alloykit.align.spec.Group.producers`):
for traced modules every Linear/Conv/BatchNorm/LayerNorm that writes a free group's units;
for BERT the MLP's intermediate units, the pooler, and every LayerNorm of the residual
stream. Llama-family layers have no biases to hold the shift, so REPAIR refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alloykit.align.activations import features
from alloykit.align.spec import Spec
from alloykit.errors import AlloyError


class _Stop(Exception):
    """Raised by a hook once the layer being measured has run (the rest of the pass is not needed)."""


class ChannelStats:
    """Running per-unit mean and standard deviation."""

    def __init__(self) -> None:
        self.n = 0
        self.s = self.ss = None

    def add(self, x: torch.Tensor) -> None:
        if self.s is None:
            self.s, self.ss = x.sum(0), (x * x).sum(0)
        else:
            self.s += x.sum(0)
            self.ss += (x * x).sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.s / max(self.n, 1)

    @property
    def std(self) -> torch.Tensor:
        return (self.ss / max(self.n, 1) - self.mean ** 2).clamp_min(0).sqrt()


def unit_dim(module: nn.Module) -> int:
    """The axis of a producer's output that holds its units."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1
    return -1


def _forward(model: nn.Module, batch: Any) -> None:
    with torch.no_grad():
        model(**batch) if isinstance(batch, dict) else model(batch)


def measure(model: nn.Module, names: Sequence[str], batches: Sequence[Any], *, stop_after: str | None = None) -> dict[str, ChannelStats]:
    """Per-unit statistics of the outputs of the modules ``names`` over ``batches``."""
    modules = dict(model.named_modules())
    stats = {n: ChannelStats() for n in names}
    mask: list[Any] = [None]

    def hook(name: str):
        def fn(mod, args, out):
            stats[name].add(features(out, unit_dim(mod), mask[0]))
            if name == stop_after:
                raise _Stop
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            try:
                _forward(model, batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def forward_order(model: nn.Module, names: Sequence[str], batch: Any) -> list[str]:
    """``names`` sorted by when their modules first run."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


def producers(spec: Spec, model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(p for g in spec.groups for p in g.producers))
    if not names:
        raise AlloyError(f"REPAIR: no layer of this {spec.family} model can hold the correction (it needs a bias "
                         "beside each rescaled unit); REPAIR supports BERT and plain MLP/CNN models")
    for n in names:
        mod = modules.get(n)
        if mod is None or getattr(mod, "bias", None) is None:
            raise AlloyError(f"REPAIR: layer '{n}' has no bias to hold the correction ({spec.family} models are not supported)")
    return names


def endpoint_targets(endpoints: Sequence[nn.Module], weights: Sequence[float], names: Sequence[str],
                     batches: Sequence[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (mean, std) to restore: the weighted average of the endpoints' statistics."""
    if len(endpoints) != len(weights):
        raise AlloyError(f"REPAIR: {len(endpoints)} endpoint models but {len(weights)} weights")
    total = float(sum(weights))
    per = [measure(m.eval(), names, batches) for m in endpoints]
    return {n: (sum(w / total * s[n].mean for w, s in zip(weights, per)),
                sum(w / total * s[n].std for w, s in zip(weights, per))) for n in names}


@torch.no_grad()
def _fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """module's output unit c becomes scale[c] * y_c + shift[c]."""
    w, b = module.weight, module.bias
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.mul_(scale.to(w.dtype).view(shape))
    b.mul_(scale.to(b.dtype)).add_(shift.to(b.dtype))


def repair(merged: nn.Module, endpoints: Sequence[nn.Module], spec: Spec, batches: Sequence[Any], *,
           weights: Sequence[float] | None = None, targets: dict | None = None, eps: float = 1e-8) -> nn.Module:
    """Rescale ``merged``'s units in place so their statistics on ``batches`` match the endpoints' average.

    ``endpoints``: the (aligned) models that were interpolated; ``weights``: their weights in
    the merge (default equal). ``targets``: precomputed :func:`endpoint_targets` (reused
    along a linear path). Returns ``merged``.
    """
    batches = list(batches)
    if not batches:
        raise AlloyError("REPAIR needs calibration data")
    names = producers(spec, merged)
    if targets is None:
        targets = endpoint_targets(endpoints, weights or [1.0] * len(endpoints), names, batches)
    merged.eval()
    modules = dict(merged.named_modules())
    for name in forward_order(merged, names, batches[0]):
        got = measure(merged, [name], batches, stop_after=name)[name]
        mu_t, sd_t = targets[name]
        scale = sd_t / (got.std + eps)
        _fold(modules[name], scale, mu_t - scale * got.mean)
    return merged
