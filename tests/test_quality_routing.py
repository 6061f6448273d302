"""The quality benchmark's routing rows (benchmarks/quality/quality_bench/routing.py) on a toy track.

A stand-in for the harness's Bench (the attributes the rows read: the track's base module and
data, the seed's fine-tunes and heads, AdaMerging's search settings, the cache): three tasks
whose inputs live in disjoint coordinates, fine-tunes that change only their task's block. The
rows must score every task, record their grids and costs, and WEMoE's trained routers must be
cached so that a rerun (``--update``) scores the same model without training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
routing = pytest.importorskip("quality_bench.routing")

from quality_bench.rows import get_row  # noqa: E402

D, H, TASKS = 12, 16, ["a", "b", "c"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(D, H), "down_proj": nn.Linear(H, D)})

    def forward(self, x):
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class Encoder(nn.Module):
    """Named like a transformer (``layers.N.mlp.up_proj``) so the tensor roles find the MLPs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x):  # [batch, tokens, D] -> mean-pooled features
        return self.layers[0](x).mean(1)


@dataclass
class Data:
    x: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        return self.x[idx]

    def head(self, n):
        return Data(self.x[:n], self.labels[:n])


class Track:
    hidden = D

    def __init__(self, cache: Path):
        torch.manual_seed(0)
        self.module, self.cache, self.tasks = Encoder().eval(), cache, TASKS
        self.base_sd = {k: v.clone() for k, v in self.module.state_dict().items()}
        self._data = {}
        for k, t in enumerate(TASKS):
            for split, n in (("val", 24), ("test", 40)):
                g = torch.Generator().manual_seed(hash((t, split)) % 1000)
                x = torch.zeros(n, 3, D)
                x[..., 4 * k:4 * k + 4] = torch.rand(n, 3, 4, generator=g) + 0.5
                self._data[t, split] = Data(x, (x[:, 0, 4 * k] > 1.0).long())

    def data(self, task, split):
        return self._data[task, split]

    def features(self, module, inputs):
        return module(inputs)

    def entropy_objective(self, module, heads, split, n):
        tasks = self.tasks
        data = [self.data(t, split) for t in tasks]

        class Objective:
            names = list(tasks)

            def size(self, task):
                return len(data[task])

            def entropy(self, params, task, idx):
                feats = torch.func.functional_call(module, params, (data[task].batch(idx),))
                p = torch.softmax(heads[tasks[task]](feats), -1)
                return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()

        return Objective()


@dataclass
class FineTunes:
    sd: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Search:
    steps: int = 5
    batch_size: int = 8
    split: str = "test"


class Bench:
    merge_seed = 0

    def __init__(self, cache: Path):
        self.track, self.tasks, self.search, self.logged = Track(cache), TASKS, Search(), []
        self.ft = FineTunes()
        for k, t in enumerate(TASKS):
            g = torch.Generator().manual_seed(10 + k)
            sd = {n: v.clone() for n, v in self.track.base_sd.items()}
            sd["layers.0.mlp.up_proj.weight"][:, 4 * k:4 * k + 4] += torch.randn(H, 4, generator=g)
            self.ft.sd[t] = sd
            self.ft.heads[t] = nn.Linear(D, 2)
            self.ft.meta[t] = {"folder": f"/cache/finetunes/{t}-s0-key{k}"}

    def finetunes(self, seed):
        return self.ft

    def log(self, msg):
        self.logged.append(msg)


def test_smile_row_scores_every_task_and_reports_its_grid_and_cost(tmp_path):
    bench = Bench(tmp_path)
    out = get_row("smile").run(bench, 0)
    assert get_row("smile").kind == "routing"
    assert sorted(out["scores"]) == TASKS and all(len(v) == 40 and v.dtype == torch.bool for v in out["scores"].values())
    assert len(out["grid"]) == len(routing.SMILE_GRID)
    assert out["cost"]["parameters"] > 1 and out["cost"]["inference_cpu"] > 0
    assert "x parameters" in out["chosen"]


def test_wemoe_row_caches_its_trained_routers(tmp_path):
    bench = Bench(tmp_path)
    first = get_row("wemoe").run(bench, 0)
    cached = sorted((tmp_path / "routing").iterdir())
    assert len(cached) == len(routing.WEMOE_LRS) and all((c / "routed.json").is_file() for c in cached)
    assert [g["params"] for g in first["grid"]] == [f"lr={lr}" for lr in routing.WEMOE_LRS]
    bench2 = Bench(tmp_path)
    again = get_row("wemoe").run(bench2, 0)
    assert any("trained routers from" in m for m in bench2.logged)  # loaded, not trained again
    assert not any("step" in m for m in bench2.logged)
    for t in TASKS:
        assert torch.equal(first["scores"][t], again["scores"][t])
    assert first["grid"] == again["grid"]


def test_twin_merging_row_routes_each_toy_task_to_its_expert(tmp_path):
    bench = Bench(tmp_path)
    out = get_row("twin_merging").run(bench, 0)
    assert get_row("twin_merging").kind == "routing"
    assert sorted(out["scores"]) == TASKS and all(len(v) == 40 and v.dtype == torch.bool for v in out["scores"].values())
    # the toy encoder has no "blocks.1": only its output feeds the router
    assert len(out["grid"]) == len(routing.TWIN_SHARED) * len(routing.TWIN_TARGETS) * len(routing.TWIN_RANKS)
    assert all("features=output" in g["params"] for g in out["grid"])
    # the toy tasks' inputs live on disjoint coordinates: the router tells them apart on unseen inputs
    assert all(g["router_held_out_val"]["mean_top1"] == 1.0 for g in out["grid"])
    assert all(r["top1"] == 1.0 and r["weight"] > 0.9 for r in out["router"]["test"].values())
    assert out["cost"]["parameters"] > 1 and "x parameters" in out["chosen"] and "rank=" in out["chosen"]
