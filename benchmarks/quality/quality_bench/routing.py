"""Routing rows: SMILE, WEMoE and Twin-Merging (``alloykit.moe``), scored beside the static merges.

A routed model keeps the fine-tunes' updates apart and chooses among them per input, so
it is not one encoder state dict: each row builds the routed encoder from the seed's
fine-tunes, scores it with each task's fine-tuned head, and measures what routing costs
against one dense encoder: stored parameters, and CPU time of the same forward passes
(the first ``COST_EXAMPLES`` test inputs of every task, best of three, routed and dense in
turn in one process).

* ``smile``: training-free. Each linear layer of the blocks gets one low-rank expert per
  task (SVD of its update), routed per token by projection norm, top-1; norms and embeddings
  averaged (each task is scored with its own fine-tuned head, as every row is). ``rank`` and ``gate_rank`` chosen on validation.
* ``wemoe``: each MLP's linears become base + sum_k r_k(x) tau_k with a per-block router,
  everything else task arithmetic at 0.3; the routers trained by entropy minimisation on the
  unlabelled adaptation inputs of every task (the split and budget AdaMerging's rows use), Adam,
  one batch per task per step, the learning rate chosen on validation; trained routers are
  cached under the track's cache (``routing/``), so ``--update`` reruns only score them.
* ``twin_merging``: a static shared merge plus each task's exclusive part (its fine-tune minus
  the shared merge, truncated SVD per linear of the blocks), mixed per input by a router trained
  by cross-entropy to tell which task an input came from, on the tasks' VALIDATION inputs only
  (the paper's setting); the shared merge, the router's features, which linears keep exclusive
  parts and their rank chosen on validation, each point scored with cross-fitted routers
  (trained on one half of validation, routing the other). Where tasks share their inputs (fashion and fashion_coarse are the same
  images) the router cannot tell them apart and spreads its weight over them. The router's
  top-1 accuracy is reported per task on held-out validation and on test (diagnostic only,
  nothing is chosen on test).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from alloykit.moe.routed import attach_twin_router, load_routed_model, parameter_count, save_routed
from alloykit.moe.routing import smile, wemoe
from alloykit.moe.twin import task_features, train_router, twin_merging, with_rank
from quality_bench.bench import Bench, mean_accuracy
from quality_bench.rows import register_row

#: SMILE's validation grid: (rank of each expert, rank of its router), top-1 routing
SMILE_GRID = [(8, 4), (32, 8), (128, 16)]
#: WEMoE's router training: AdaMerging's budget and learning rate here (``bench.search``: 500 steps, batches of
#: 16, the unlabelled split; lr 1e-3), routers initialised to task arithmetic at WEMOE_LAMBDA. More than one
#: learning rate is chosen among on validation; FusionBench's (1e-4, with 1000 steps) was not run here: it did
#: not fit the CPU time of this machine
WEMOE_LRS, WEMOE_LAMBDA = (1e-3,), 0.3
COST_EXAMPLES = 64


@torch.no_grad()
def features(bench: Bench, module: nn.Module, task: str, split: str, limit: int | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """The encoder ``module``'s features of ``split`` of ``task`` (``Track.embed``'s batching, any module)."""
    tr = bench.track
    data = tr.data(task, split)
    data = data.head(limit) if limit is not None else data
    module.eval()
    order = torch.argsort(data.lengths, stable=True) if hasattr(data, "lengths") else torch.arange(len(data))
    out = torch.empty(len(data), tr.hidden)
    for i in range(0, len(data), batch_size):
        idx = order[i:i + batch_size]
        out[idx] = tr.features(module, data.batch(idx))
    return out


def scores(bench: Bench, module: nn.Module, heads: dict[str, nn.Linear], split: str) -> dict[str, torch.Tensor]:
    data = {t: bench.track.data(t, split) for t in bench.tasks}
    with torch.no_grad():
        return {t: heads[t](features(bench, module, t, split)).argmax(-1) == data[t].labels for t in bench.tasks}


def cost(bench: Bench, routed: nn.Module) -> dict[str, float]:
    """Parameters and forward CPU time of ``routed`` relative to one dense encoder (the base)."""
    dense = copy.deepcopy(bench.track.module)
    dense.load_state_dict(bench.track.base_sd)
    dense.eval()

    def cpu(m: nn.Module) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            for t in bench.tasks:
                features(bench, m, t, "test", COST_EXAMPLES)
            best = min(best, time.process_time() - t0)
        return best

    d, r = cpu(dense), cpu(routed)
    return {"parameters": parameter_count(routed) / parameter_count(dense), "inference_cpu": r / d,
            "dense_cpu_s": round(d, 3), "routed_cpu_s": round(r, 3)}


def describe_cost(c: dict[str, float]) -> str:
    return f"{c['parameters']:.2f}x parameters, {c['inference_cpu']:.1f}x inference CPU time"


def _base_module(bench: Bench) -> nn.Module:
    module = copy.deepcopy(bench.track.module)
    module.load_state_dict(bench.track.base_sd)
    return module.eval()


@register_row("smile", kind="routing", description="SMILE: zero-shot low-rank experts per task, routed per token by "
              "projection norm (Tang et al. 2024)")
def smile_row(bench: Bench, seed: int) -> dict:
    ft = bench.finetunes(seed)
    sds = [ft.sd[t] for t in bench.tasks]
    tried, best = [], None
    for rank, gate_rank in SMILE_GRID:
        routed = smile(_base_module(bench), sds, rank=rank, gate_rank=gate_rank, top_k=1, experts=bench.tasks)
        val = scores(bench, routed, ft.heads, "val")
        tried.append({"params": f"rank={rank}, gate_rank={gate_rank}", "val_avg": mean_accuracy(val)})
        bench.log(f"    smile seed {seed} [rank {rank}, gate {gate_rank}]: val {100 * tried[-1]['val_avg']:.1f}")
        if best is None or tried[-1]["val_avg"] > best[0]:
            best = (tried[-1]["val_avg"], rank, gate_rank, routed)
    _, rank, gate_rank, routed = best
    c = cost(bench, routed)
    return {"scores": scores(bench, routed, ft.heads, "test"), "grid": tried, "cost": c,
            "chosen": f"rank={rank}, gate_rank={gate_rank}, top_k=1; {describe_cost(c)}"}


@register_row("wemoe", kind="routing", description="WEMoE: task vectors of the MLPs weighted per token by routers "
              "trained on unlabelled inputs (Tang et al. 2024)")
def wemoe_row(bench: Bench, seed: int) -> dict:
    ft, tried, best = bench.finetunes(seed), [], None
    for lr in WEMOE_LRS:
        routed = trained_wemoe(bench, seed, lr)
        val = scores(bench, routed, ft.heads, "val")
        entropy = routed.alloykit_routing["settings"]["entropy"]
        tried.append({"params": f"lr={lr}", "val_avg": mean_accuracy(val), "entropy": entropy})
        bench.log(f"    wemoe seed {seed} [lr {lr}]: val {100 * tried[-1]['val_avg']:.1f}, entropy {entropy['first']:.3f} -> "
                  f"{entropy['last']:.3f}")
        if best is None or tried[-1]["val_avg"] > best[0]:
            best = (tried[-1]["val_avg"], lr, routed)
    _, lr, routed = best
    c, cfg = cost(bench, routed), bench.search
    return {"scores": scores(bench, routed, ft.heads, "test"), "cost": c, "grid": tried,
            "search": {"steps": cfg.steps, "lr": lr, "init_lambda": WEMOE_LAMBDA, "batch_size": cfg.batch_size,
                       "inputs": f"{cfg.split} split, unlabelled"},
            "chosen": f"{cfg.steps} steps, lr {lr}, lambda0 {WEMOE_LAMBDA}; {describe_cost(c)}"}


def trained_wemoe(bench: Bench, seed: int, lr: float) -> nn.Module:
    """WEMoE with its routers trained at ``lr``, cached under the track's cache (``routing/``): the
    training is the expensive part, and a rerun (``--update``) with the same settings reuses it."""
    tr, cfg, ft = bench.track, bench.search, bench.finetunes(seed)
    settings = {"steps": cfg.steps, "lr": lr, "init_lambda": WEMOE_LAMBDA, "batch_size": cfg.batch_size,
                "split": cfg.split, "merge_seed": bench.merge_seed, "v": 1,
                "finetunes": [Path(ft.meta[t]["folder"]).name for t in bench.tasks]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = tr.cache / "routing" / f"wemoe-s{seed}-{key}"
    if (folder / "routed.json").is_file():
        bench.log(f"    wemoe seed {seed} [lr {lr}]: trained routers from {folder}")
        return load_routed_model(folder, module=_base_module(bench))
    heads = {t: copy.deepcopy(ft.heads[t]) for t in bench.tasks}
    routed = wemoe(_base_module(bench), [ft.sd[t] for t in bench.tasks], init_lambda=WEMOE_LAMBDA,
                   router_hidden_layers=1, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                   seed=bench.merge_seed, experts=bench.tasks,
                   objective_for=lambda m: tr.entropy_objective(m, heads, cfg.split, None),
                   log=lambda msg: bench.log(f"    wemoe seed {seed} [lr {lr}]:{msg}"))
    save_routed(routed, folder, overwrite=True)
    return routed


#: Twin-Merging's validation grid: the shared merge (method, parameters), the router's features (the
#: module whose pooled output it reads under the shared model: "" the encoder's output, "blocks.1" the
#: second block's tokens, mean-pooled; skipped where the track's encoder has no such module), which linears keep exclusive parts (the blocks', or every linear,
#: the patch embedding too) and their rank (96: full rank at this width)
TWIN_SHARED = [("task_arithmetic", {"lambda": 0.3}), ("linear", {})]
TWIN_FEATURES = ("", "blocks.1")
TWIN_TARGETS = ("blocks", "linears")
TWIN_RANKS = (16, 48, 96)
#: the router: one hidden layer, full-batch Adam on the cross-entropy of the task labels
TWIN_ROUTER = {"hidden": 64, "steps": 300, "lr": 1e-2, "weight_decay": 1e-4}


def _val_batches(bench: Bench, task: str, batch_size: int = 256) -> list:
    data = bench.track.data(task, "val")
    return [data.batch(torch.arange(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]


@register_row("twin_merging", kind="routing", description="Twin-Merging: a shared merge plus low-rank exclusive parts per "
              "task, mixed per input by a router trained on task-labelled validation inputs (Lu et al. 2024)")
def twin_row(bench: Bench, seed: int) -> dict:
    """Every grid point is scored on validation with cross-fitted routers (each validation input
    routed by a router trained on the other half of validation), so that no point wins by its
    router having seen the inputs it is scored on; the chosen point's router is then trained on
    all of validation and the model scored once on test."""
    ft, tr = bench.finetunes(seed), bench.track
    sds = [ft.sd[t] for t in bench.tasks]
    inputs = [_val_batches(bench, t) for t in bench.tasks]
    features = [f for f in TWIN_FEATURES if f in dict(tr.module.named_modules())]
    tried, best = [], None
    for shared, params in TWIN_SHARED:
        routers: dict[str, dict] = {}  # the routers read the shared model only: one set per (shared, features)
        for targets in TWIN_TARGETS:
            # built once at the largest rank; the smaller ranks are its truncations (the same SVDs)
            full = twin_merging(_base_module(bench), sds, inputs, rank=max(TWIN_RANKS), shared=shared,
                                shared_parameters=params, targets=targets, feature_module=features[0],
                                seed=bench.merge_seed, experts=bench.tasks, call=tr.features,
                                router_hidden=TWIN_ROUTER["hidden"], steps=TWIN_ROUTER["steps"], lr=TWIN_ROUTER["lr"],
                                weight_decay=TWIN_ROUTER["weight_decay"])
            for feature_module in features:
                if feature_module not in routers:
                    routers[feature_module] = fold_routers(bench, full, inputs, feature_module)
                r = routers[feature_module]
                for rank in TWIN_RANKS:
                    routed = with_rank(full, rank)
                    routed.alloykit_routing["settings"].update(feature_module=feature_module, router=r["settings"])
                    val = cross_fitted_scores(bench, routed, ft.heads, r)
                    attach_twin_router(routed, r["all"])
                    label = (f"shared={shared}{''.join(f', {k}={v}' for k, v in params.items())}, features="
                             f"{feature_module or 'output'}, targets={targets}, rank={rank}")
                    tried.append({"params": label, "val_avg": mean_accuracy(val), "router_held_out_val": r["held_out"]})
                    bench.log(f"    twin_merging seed {seed} [{label}]: val {100 * tried[-1]['val_avg']:.1f} (cross-fitted), "
                              f"router top-1 on held-out val {r['held_out']['mean_top1']:.2f}")
                    if best is None or tried[-1]["val_avg"] > best[0]:
                        best = (tried[-1]["val_avg"], label, routed)
    _, label, routed = best
    c = cost(bench, routed)
    return {"scores": scores(bench, routed, ft.heads, "test"), "grid": tried, "cost": c,
            "router": {"settings": {**TWIN_ROUTER, "inputs": "validation, labelled by task"},
                       "test": router_accuracy(bench, routed, "test")},
            "chosen": f"{label}, router on {sum(len(tr.data(t, 'val')) for t in bench.tasks)} validation inputs; "
                      f"{describe_cost(c)}"}


def fold_routers(bench: Bench, routed: nn.Module, inputs: list, feature_module: str) -> dict:
    """Three routers reading ``feature_module`` of ``routed``'s shared model, trained like the row's:
    on all of validation (the one the chosen model keeps) and on either half of each task's
    validation inputs; the halves' routers scored on the other half (top-1 on the right task: how
    routing generalises to unseen inputs of the same tasks)."""
    feats, labels = task_features(routed, inputs, feature_module, call=bench.track.features)
    first = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(len(bench.tasks)):
        idx = torch.nonzero(labels == k).flatten()
        first[idx[:len(idx) // 2]] = True
    with torch.enable_grad():
        trained = [train_router(feats[rows], labels[rows], len(bench.tasks), seed=bench.merge_seed,
                                feature_module=feature_module, **TWIN_ROUTER)
                   for rows in (torch.ones_like(first), first, ~first)]
    with torch.no_grad():
        top = torch.empty(len(labels), dtype=torch.bool)
        top[~first] = trained[1](feats[~first]).argmax(-1) == labels[~first]
        top[first] = trained[2](feats[first]).argmax(-1) == labels[first]
    per_task = {t: round(float(top[labels == k].float().mean()), 3) for k, t in enumerate(bench.tasks)}
    settings = {**TWIN_ROUTER, "seed": bench.merge_seed, "inputs": int(len(labels)),
                "train_accuracy": round(float((trained[0](feats).argmax(-1) == labels).float().mean()), 4)}
    return {"all": trained[0], "folds": trained[1:], "first": first, "labels": labels, "settings": settings,
            "held_out": {"mean_top1": round(float(top.float().mean()), 3), "per_task": per_task}}


def cross_fitted_scores(bench: Bench, routed: nn.Module, heads: dict, routers: dict) -> dict[str, torch.Tensor]:
    """Validation scores where each input is routed by the fold router that did not see it."""
    by_fold = []
    for router in routers["folds"]:
        attach_twin_router(routed, router)
        by_fold.append(scores(bench, routed, heads, "val"))
    out = {}
    for k, t in enumerate(bench.tasks):
        first = routers["first"][routers["labels"] == k]  # this task's validation rows, in order
        out[t] = torch.where(first, by_fold[1][t], by_fold[0][t])
    return out


def router_accuracy(bench: Bench, routed: nn.Module, split: str) -> dict[str, dict[str, float]]:
    """Per task: how often the router's top weight is the task's own expert, and its mean weight."""
    out = {}
    with torch.no_grad():
        for k, t in enumerate(bench.tasks):
            data, w = bench.track.data(t, split), []
            for i in range(0, len(data), 256):
                bench.track.features(routed, data.batch(torch.arange(i, min(i + 256, len(data)))))
                w.append(routed.twin_last_weights)
            w = torch.cat(w)
            out[t] = {"top1": round(float((w.argmax(-1) == k).float().mean()), 3), "weight": round(float(w[:, k].mean()), 3)}
    return out


ROUTING_ROWS = ["smile", "wemoe", "twin_merging"]
