"""Twin-Merging: shared knowledge merged statically, each task's exclusive knowledge kept as a
low-rank part, mixed per input by a router trained on which task an input came from.

Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", arXiv:2406.15479:

    theta_s       = a static merge of the fine-tunes (task arithmetic: theta_0 + lambda sum_k tau_k)
    exclusive_k   = SVD_r(theta_k - theta_s)                 (per linear layer, top-r singular triplets)
    w(x)          = softmax(R(Emb(x)))                      (Emb: the shared model's features of x)
    theta*(x)     = theta_s + sum_k w_k(x) exclusive_k

The router R is trained by cross-entropy on a few labelled-by-task inputs (the paper uses the
tasks' validation inputs). Only linear layers carry exclusive parts (``targets`` as in
:func:`~alloykit.moe.routing.smile`); every other tensor is the shared merge's. The layers
compute theta*(x) exactly per sample (:class:`~alloykit.moe.routed.TwinLinear`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alloykit.errors import AlloyError
from alloykit.moe.routed import TwinLinear, TwinRouter, attach_twin_router, set_module, shared_features
from alloykit.moe.routing import _host, _linear_of, expert_updates, linear_targets, merge_static, state_dict_of

_log = logging.getLogger(__name__)

#: the shared merge when none is given: task arithmetic at the paper's usual scale
DEFAULT_SHARED = ("task_arithmetic", {"lambda": 0.3})


@torch.no_grad()
def with_rank(model: nn.Module, rank: int) -> nn.Module:
    """A copy of a Twin-Merging model whose exclusive parts keep only their top ``rank`` singular
    triplets: the model ``twin_merging`` builds at that rank (the SVD is sorted), without
    recomputing it. A rank above a layer's own keeps that layer whole."""
    if rank < 1:
        raise AlloyError(f"with_rank: rank {rank}: must be at least 1")
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, TwinLinear) and rank < m.rank:
            m.u = nn.Parameter(m.u[:, :, :rank].clone(), requires_grad=False)
            m.svh = nn.Parameter(m.svh[:, :rank].clone(), requires_grad=False)
            m.rank = rank
    if hasattr(out, "alloykit_routing"):
        out.alloykit_routing["settings"]["rank"] = rank
    return out


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def twin_merging(base: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor] | nn.Module],
                 inputs: Sequence[Iterable[Any]] | None = None, *, rank: int = 16, shared: str = DEFAULT_SHARED[0],
                 shared_parameters: dict[str, Any] | None = None, targets: str = "blocks", router: TwinRouter | None = None,
                 router_hidden: int = 0, feature_module: str = "", steps: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0, experts: Sequence[str] | None = None,
                 call: Callable[[nn.Module, Any], Any] = call_model) -> nn.Module:
    """Twin-Merging: theta*(x) = theta_s + sum_k w_k(x) SVD_rank(theta_k - theta_s), w(x) =
    softmax(R(Emb(x))), Emb(x) the shared model's (pooled) output of ``feature_module`` (``""``:
    the model's output). Lu et al., NeurIPS 2024, arXiv:2406.15479.

    ``shared``/``shared_parameters``: the registered method making theta_s (default task
    arithmetic, lambda 0.3). ``inputs[k]``: batches of task k's inputs, each run as ``call(model,
    batch)`` (default: a tensor as ``model(x)``, a tuple as ``model(*x)``, a dict as
    ``model(**x)``), on which the router is trained to tell task k (:func:`train_router`); or pass
    a trained ``router``. Every linear layer in the blocks (``targets="blocks"``; ``"mlp"``: MLP
    projections only; ``"linears"``: every ``nn.Linear``) changed by a fine-tune keeps one
    rank-``rank`` exclusive part per fine-tune; all other tensors are theta_s.
    """
    if rank < 1:
        raise AlloyError(f"twin_merging: rank {rank}: must be at least 1")
    sds = [state_dict_of(m) for m in finetuned]
    if inputs is not None and len(inputs) != len(sds):
        raise AlloyError(f"twin_merging: inputs for {len(inputs)} tasks, {len(sds)} fine-tunes: give one list of "
                         "batches per fine-tune, in the same order")
    if router is None and inputs is None:
        raise AlloyError("twin_merging: give inputs (batches of each task's inputs, to train the router) or a router")
    names = linear_targets(base, sds, targets)
    if shared_parameters is None and shared == DEFAULT_SHARED[0]:
        shared_parameters = DEFAULT_SHARED[1]
    model = _host(base, merge_static(state_dict_of(base), sds, shared, shared_parameters, skip=set()))
    for name in names:
        set_module(model, name, twin_layer(model.get_submodule(name), [_linear_of(sd, name) for sd in sds], rank))
    settings: dict[str, Any] = {"rank": rank, "shared": shared, "shared_parameters": shared_parameters or {},
                                "targets": targets, "feature_module": feature_module}
    if router is None:
        feats, labels = task_features(model, inputs, feature_module, call)
        with torch.enable_grad():
            router = train_router(feats, labels, len(sds), hidden=router_hidden, steps=steps, lr=lr,
                                  weight_decay=weight_decay, seed=seed, feature_module=feature_module)
        settings["router"] = {"hidden": router_hidden, "steps": steps, "lr": lr, "weight_decay": weight_decay,
                              "seed": seed, "inputs": int(len(labels)),
                              "train_accuracy": round(float((router(feats).argmax(-1) == labels).float().mean()), 4)}
    attach_twin_router(model, router)
    model.alloykit_routing = {"method": "twin_merging", "settings": settings,
                              "experts": list(experts or [f"model{i}" for i in range(len(sds))])}
    return model.eval()


@torch.no_grad()
def twin_layer(shared: nn.Linear, experts: Sequence[tuple[torch.Tensor, torch.Tensor | None]], rank: int) -> TwinLinear:
    """One :class:`TwinLinear` from the shared layer and each fine-tune's (weight, bias): expert k is
    the top-``rank`` SVD of W_k - W_s, plus b_k - b_s in full."""
    out_f, in_f = shared.weight.shape
    r = min(rank, out_f, in_f)
    layer = TwinLinear(in_f, out_f, len(experts), r, bias=shared.bias is not None)
    layer.base.load_state_dict(shared.state_dict())
    for k, (u, s, vh, db) in enumerate(expert_updates(shared, experts)):
        layer.u[k] = u[:, :r]
        layer.svh[k] = s[:r, None] * vh[:r]
        if layer.bias_delta is not None:
            layer.bias_delta[k] = db
    return layer


@torch.no_grad()
def task_features(model: nn.Module, inputs: Sequence[Iterable[Any]], feature_module: str = "",
                  call: Callable[[nn.Module, Any], Any] = call_model) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared model's pooled features of every batch of ``inputs[k]`` (run as ``call(model,
    batch)``), labelled k: the router's training set."""
    feats, labels = [], []
    for k, batches in enumerate(inputs):
        for batch in batches:
            f = shared_features(model, lambda: call(model, batch), feature_module).float()
            feats.append(f)
            labels.append(torch.full((len(f),), k, dtype=torch.long))
    if not feats:
        raise AlloyError("twin_merging: the inputs hold no batch: give each task a few of its inputs")
    return torch.cat(feats), torch.cat(labels)


def train_router(features: torch.Tensor, labels: torch.Tensor, n_experts: int, *, hidden: int = 0, steps: int = 300,
                 lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0, feature_module: str = "") -> TwinRouter:
    """A :class:`TwinRouter` trained to predict which task (``labels``) each row of ``features`` came
    from: full-batch Adam on the cross-entropy of R's logits, features standardised first."""
    if steps < 1 or not math.isfinite(lr) or lr <= 0 or hidden < 0:
        raise AlloyError(f"train_router: steps {steps}, lr {lr}, hidden {hidden}: need steps >= 1, lr > 0, hidden >= 0")
    if int(labels.min()) < 0 or int(labels.max()) >= n_experts:
        raise AlloyError(f"train_router: labels must lie in [0, {n_experts}), got [{int(labels.min())}, {int(labels.max())}]")
    router = TwinRouter(features.shape[1], n_experts, hidden, feature_module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.shift.copy_(features.mean(0))
        router.scale.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones(features.shape[1]))
        for m in router.net:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=gen)
                m.bias.zero_()
    opt = torch.optim.Adam(router.net.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(router.logits(features), labels)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 4) == 0:
            _log.info("twin router step %d/%d: cross-entropy %.4f", step + 1, steps, float(loss.detach()))
    return router.eval()
