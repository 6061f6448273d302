"""Routed merges of fine-tunes of one base: SMILE (training-free) and WEMoE (routers trained on
unlabelled inputs). Both keep the routed layers' experts apart and merge every other tensor
statically, through the planner and executor like any merge.

Inputs: the base as a module (its architecture hosts the routing; its current weights are
theta_0) and the fine-tunes as state dicts or modules of that architecture. The result is a
copy of the base with routed layers in place (``alloykit.moe.routed``); ``save_routed``
writes it, ``load_routed_model`` reads it back.

Which linears are routed is read from the tensor roles (``alloykit.roles``), never from
names: ``blocks`` every ``nn.Linear`` inside the repeated blocks (SMILE's choice: attention
and MLP), ``mlp`` the MLP projections only (WEMoE's), ``linears`` every ``nn.Linear`` of the
model (the blocks' and those outside them: an input projection, a patch embedding, a head).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from alloykit.config import parse_recipe
from alloykit.errors import AlloyError
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.methods.registry import get_method
from alloykit.moe.routed import EnsembleLinear, SmileLinear, TwinLinear, WEMoERouter, set_module
from alloykit.plan.executor import run_jobs
from alloykit.plan.planner import make_plan
from alloykit.progress import Progress
from alloykit.roles import Kind, role_of
from alloykit.search.adamerging import Objective

_log = logging.getLogger(__name__)

TARGETS = ("blocks", "mlp", "linears")
#: which MLP linear reads the block input and so owns the block's WEMoE router (first found)
_ROUTER_OWNER = (Kind.MLP_GATE, Kind.MLP_GATE_UP, Kind.MLP_UP)


def state_dict_of(model: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in (model.state_dict() if isinstance(model, nn.Module) else model).items()}


def linear_targets(base: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], targets: str) -> list[str]:
    """Module names of the ``nn.Linear`` layers to route: in a block (``blocks``), MLP projections
    (``mlp``) or all of them (``linears``), and changed by at least one fine-tune (an unchanged
    layer has no expert to keep)."""
    if targets not in TARGETS:
        raise AlloyError(f"targets '{targets}': use one of {', '.join(TARGETS)}")
    out = []
    for name, m in base.named_modules():
        if not isinstance(m, nn.Linear) or isinstance(m, (SmileLinear, EnsembleLinear, TwinLinear)):
            continue
        role = role_of(f"{name}.weight")
        if (role.layer is None and targets != "linears") or (targets == "mlp" and not role.is_mlp):
            continue
        tensors = [f"{name}.weight"] + ([f"{name}.bias"] if m.bias is not None else [])
        for sd in finetuned:
            missing = [t for t in tensors if t not in sd]
            if missing:
                raise AlloyError(f"a fine-tune has no tensor '{missing[0]}' of the base's module '{name}': "
                                 "the fine-tunes must be state dicts of the base's architecture")
        if any(not torch.equal(sd[t], base.get_parameter(t)) for sd in finetuned for t in tensors):
            out.append(name)
    if not out:
        raise AlloyError(f"no fine-tune changed any linear layer of the base ({targets}): nothing to route")
    return out


def merge_static(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], method: str,
                 parameters: dict[str, Any] | None, skip: set[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor but ``skip`` merged by a registered method (the planner and executor of
    ``alloykit merge``); ``method`` "base" keeps the base's tensors."""
    if method == "base":
        return {k: v for k, v in base.items() if k not in skip}
    spec = get_method(method)
    preloaded = {f"model{i}": StateDictCheckpoint(dict(sd), f"model{i}") for i, sd in enumerate(finetuned)}
    # every fine-tune counts once: a method's per-model weight, where it declares one, is 1
    weight = {"parameters": {"weight": 1.0}} if "weight" in spec.model_params.model_fields else {}
    recipe: dict[str, Any] = {"merge_method": method, "models": [{"model": ref, **weight} for ref in preloaded]}
    if spec.base != "ignored":  # a method without a base would merge it as one more model
        preloaded["base"] = StateDictCheckpoint(dict(base), "base")
        recipe["base_model"] = "base"
    if parameters:
        recipe["parameters"] = parameters
    plan = make_plan(parse_recipe(recipe), seed=seed, preloaded=preloaded)
    out: dict[str, torch.Tensor] = {}
    run_jobs(plan, out.__setitem__, threads=1, progress=False, skip=skip)
    return out


def _host(base: nn.Module, rest: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the base holding the statically merged tensors."""
    model = copy.deepcopy(base)
    missing = set(model.state_dict()) - set(rest)
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k in missing}, **rest}, strict=True)
    return model


def _tensors(name: str, module: nn.Linear) -> list[str]:
    return [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])


# -- SMILE -----------------------------------------------------------------------------------------
@torch.no_grad()
def smile(base: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor] | nn.Module], *, rank: int = 32,
          gate_rank: int = 16, top_k: int = 1, targets: str = "blocks", rest: str = "linear",
          rest_parameters: dict[str, Any] | None = None, experts: Sequence[str] | None = None,
          progress: bool = False) -> nn.Module:
    """SMILE: each routed linear keeps the base's weight plus one rank-``rank`` expert per fine-tune
    (the top singular triplets of its update W_k - W0), routed per token by ||V_k,g^T x|| over the
    first ``gate_rank`` right singular vectors, ``top_k`` experts per token. No data, no training.

    ``rest``: how every other tensor (norms, embeddings, heads) is merged: a registered method
    (default ``linear``, the average of the fine-tunes, as SMILE's ``average_experts``) or
    ``base``. Tang et al. 2024, arXiv:2408.10174.
    """
    if rank < 1 or gate_rank < 1 or top_k < 1:
        raise AlloyError(f"smile: rank {rank}, gate_rank {gate_rank}, top_k {top_k}: each must be at least 1")
    sds = [state_dict_of(m) for m in finetuned]
    base_sd = state_dict_of(base)
    names = linear_targets(base, sds, targets)
    routed_tensors = {t for n in names for t in _tensors(n, base.get_submodule(n))}
    model = _host(base, merge_static(base_sd, sds, rest, rest_parameters, routed_tensors))
    prog = Progress("smile", len(names), unit="layers", enabled=progress)
    for name in names:
        set_module(model, name, smile_layer(base.get_submodule(name), [_linear_of(sd, name) for sd in sds], rank,
                                            gate_rank, top_k))
        prog.update(1)
    prog.close()
    model.alloykit_routing = {"method": "smile", "experts": list(experts or [f"model{i}" for i in range(len(sds))]),
                              "settings": {"rank": rank, "gate_rank": gate_rank, "top_k": top_k, "targets": targets,
                                           "rest": rest, "rest_parameters": rest_parameters or {}}}
    return model.eval()


def _linear_of(sd: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return sd[f"{name}.weight"], sd.get(f"{name}.bias")


@torch.no_grad()
def expert_updates(ref: nn.Linear, experts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]):
    """Per fine-tune, the SVD (u, s, vh) of its weight minus ``ref``'s and its bias minus ``ref``'s
    (None without a bias): what SMILE's and Twin-Merging's low-rank experts are cut from."""
    w0 = ref.weight.detach().float()
    for w, b in experts:
        u, s, vh = torch.linalg.svd(w.float() - w0, full_matrices=False)
        yield u, s, vh, (b.float() - ref.bias.detach().float() if ref.bias is not None else None)


@torch.no_grad()
def smile_layer(base: nn.Linear, experts: Sequence[tuple[torch.Tensor, torch.Tensor | None]], rank: int, gate_rank: int,
                top_k: int) -> SmileLinear:
    """One :class:`SmileLinear` from the base layer and each fine-tune's (weight, bias)."""
    out_f, in_f = base.weight.shape
    full = min(out_f, in_f)
    r, g = min(rank, full), min(gate_rank, full)
    layer = SmileLinear(in_f, out_f, len(experts), r, g, top_k, bias=base.bias is not None)
    layer.base.load_state_dict(base.state_dict())
    for k, (u, s, vh, db) in enumerate(expert_updates(base, experts)):
        layer.gate[k * g:(k + 1) * g] = vh[:g]
        layer.u[k] = u[:, :r]
        layer.svh[k] = s[:r, None] * vh[:r]
        if layer.bias_delta is not None:
            layer.bias_delta[k] = db
    return layer


# -- WEMoE -----------------------------------------------------------------------------------------
def wemoe(base: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor] | nn.Module], objective: Objective | None = None,
          *, init_lambda: float = 0.3, router_hidden_layers: int = 1, steps: int = 200, lr: float = 1e-3,
          batch_size: int = 16, seed: int = 0, objective_for: Callable[[nn.Module], Objective] | None = None,
          experts: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> nn.Module:
    """WEMoE: every MLP linear becomes base + sum_k r_k(x) tau_k with a per-block router, every
    other tensor is task arithmetic at ``init_lambda``; the routers (initialised to output
    ``init_lambda``) are trained by Adam to minimise the prediction entropy on unlabelled inputs,
    one batch of each task per step, as AdaMerging trains its coefficients.

    ``objective_for(model)``: the unlabelled-input objective (``alloykit.search.adamerging``'s
    ``Objective``: ``entropy(params, task, idx)`` computed with ``torch.func.functional_call`` on
    the model) for the routed model, e.g. ``lambda m: HeadEntropy(m, heads, data, names)``;
    without one (and without ``objective``) the routers stay at their initialisation.
    Tang et al., ICML 2024, arXiv:2402.00433.
    """
    sds = [state_dict_of(m) for m in finetuned]
    base_sd = state_dict_of(base)
    names = linear_targets(base, sds, "mlp")
    routed_tensors = {t for n in names for t in _tensors(n, base.get_submodule(n))}
    rest = merge_static(base_sd, sds, "task_arithmetic", {"lambda": init_lambda}, routed_tensors)
    model = _host(base, rest)
    gen = torch.Generator().manual_seed(seed)
    for layer, group in _by_layer(names).items():
        owner = next((n for kind in _ROUTER_OWNER for n in group if role_of(f"{n}.weight").kind is kind), None)
        if owner is None:
            raise AlloyError(f"wemoe: layer {layer}'s MLP has no gate or up projection to read the block input from")
        for name in sorted(group, key=lambda n: n != owner):  # the owner first
            src: nn.Linear = base.get_submodule(name)
            router = None
            if name == owner:
                router = WEMoERouter(src.in_features, len(sds), router_hidden_layers, init_lambda, generator=gen)
            layer_mod = EnsembleLinear(src.in_features, src.out_features, len(sds), src.bias is not None, router)
            with torch.no_grad():
                layer_mod.base.load_state_dict(src.state_dict())
                w0 = src.weight.detach().float()
                layer_mod.task_vectors.copy_(torch.stack([sd[f"{name}.weight"].float() - w0 for sd in sds]))
                if layer_mod.task_biases is not None:
                    b0 = src.bias.detach().float()
                    layer_mod.task_biases.copy_(torch.stack([sd[f"{name}.bias"].float() - b0 for sd in sds]))
            set_module(model, name, layer_mod)
        for name in group:
            if name != owner:
                model.get_submodule(name).follow(model.get_submodule(owner))
    model.alloykit_routing = {"method": "wemoe", "experts": list(experts or [f"model{i}" for i in range(len(sds))]),
                              "settings": {"init_lambda": init_lambda, "router_hidden_layers": router_hidden_layers,
                                           "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}}
    if objective_for is not None:
        objective = objective_for(model)
    if objective is not None and steps > 0:
        history = train_routers(model, objective, steps=steps, lr=lr, batch_size=batch_size, seed=seed, log=log)
        model.alloykit_routing["settings"]["entropy"] = {"first": history[0], "last": history[-1]}
    return model.eval()


def _by_layer(names: Sequence[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in names:
        out.setdefault(role_of(f"{n}.weight").layer, []).append(n)
    return out


def train_routers(model: nn.Module, objective: Objective, *, steps: int, lr: float = 1e-3, batch_size: int = 16,
                  seed: int = 0, log: Callable[[str], None] | None = None) -> list[float]:
    """Adam on the routers' parameters only: the summed mean prediction entropy of one batch of
    unlabelled inputs per task per step (the loop of AdaMerging, over router weights instead of
    merging coefficients). Returns the loss at every step."""
    if steps < 0 or batch_size < 1 or not math.isfinite(lr) or lr <= 0:
        raise AlloyError(f"steps {steps}, batch size {batch_size}, lr {lr}: need steps >= 0, batch size >= 1, lr > 0")
    params = dict(model.named_parameters())
    trainable = [p for n, p in params.items() if ".router." in f".{n}"]
    if not trainable:
        raise AlloyError("train_routers: the model has no router parameters (build it with wemoe())")
    frozen = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(".router." in f".{n}")
    opt = torch.optim.Adam(trainable, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sizes = [objective.size(t) for t in range(len(objective.names))]
    history: list[float] = []
    model.train(False)  # dropout off: the entropy of the model as it will be used
    prog = Progress("wemoe routers", steps, log, unit="steps")

    def batch_entropy() -> torch.Tensor:  # one random batch of each task's inputs, summed over the tasks
        picks = [torch.randperm(n, generator=gen)[:batch_size] for n in sizes]
        return torch.stack([objective.entropy(params, t, idx) for t, idx in enumerate(picks)]).sum()

    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = batch_entropy()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            prog.update(1)
            if log and (step + 1) % max(1, steps // 5) == 0:
                log(f"  step {step + 1}/{steps}: batch entropy {history[-1]:.4f}")
    finally:
        prog.close()
        for n, p in params.items():
            p.requires_grad_(frozen[n])
    return history
