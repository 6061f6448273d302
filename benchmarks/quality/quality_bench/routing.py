"""Routing rows: SMILE and WEMoE (``alloykit.moe``), scored beside the static merges.

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
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from alloykit.moe.routed import load_routed_model, parameter_count, save_routed
from alloykit.moe.routing import smile, wemoe
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


ROUTING_ROWS = ["smile", "wemoe"]
