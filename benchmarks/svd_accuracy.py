"""Randomized against exact SVD in the subspace merges: accuracy of the merged tensor and time.

    PYTHONPATH=src python benchmarks/svd_accuracy.py --out docs/svd_accuracy.json

For each shape, K fine-tune-like task vectors tau_i = L_i + noise (L_i of rank ``--rank``
with a decaying spectrum, noise of relative Frobenius size ``--noise``; one shared
direction so the tasks overlap, as fine-tunes of one base do; or ``--spectrum powerlaw``,
full rank with singular values i^-0.7) are merged by each method
with ``svd: exact`` and ``svd: randomized``. Reported: the difference of the merged
tensors relative to the norm of the exact merged task vector,
||merged_rand - merged_exact||_F / ||merged_exact - theta_0||_F (stricter than relative to
the merged tensor, which includes the base), and CPU seconds of each (one thread, the
method's function alone, in process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from alloykit.methods import get_method
from alloykit.methods.registry import MergeInput
from alloykit.roles import role_of

CASES = {  # label -> (method, parameters)
    "tsv_m (r = p/K)": ("tsv_m", {}),
    "tsv_m (fraction 0.05)": ("tsv_m", {"fraction": 0.05}),
    "tsv_m (fraction 0.15)": ("tsv_m", {"fraction": 0.15}),
    "cart (rank 0.08)": ("cart", {}),
}


def task_vectors(m: int, n: int, k: int, rank: int, noise: float, seed: int, spectrum: str = "lowrank") -> torch.Tensor:
    """``lowrank``: rank-``rank`` signal (spectrum 1 .. 10^-1.5) plus white noise; ``powerlaw``:
    full rank with singular values i^-0.7 (no floor), plus the shared direction."""
    g = torch.Generator().manual_seed(seed)
    if spectrum == "powerlaw":
        p = min(m, n)
        shared = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
        out = []
        for _ in range(k):
            u = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
            v = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
            t = (u * torch.arange(1, p + 1, dtype=torch.float32) ** -0.7) @ v.T
            out.append((t / t.norm() + 0.3 * shared / shared.norm()) * 1e-2 * (m * n) ** 0.5 / 100)
        return torch.stack(out)
    shared = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
    out = []
    for _ in range(k):
        spectrum = torch.logspace(0, -1.5, rank)
        low = (torch.randn(m, rank, generator=g) * spectrum) @ torch.randn(rank, n, generator=g)
        low = low / low.norm() + 0.3 * shared / shared.norm()
        e = torch.randn(m, n, generator=g)
        out.append((low + noise * e / e.norm()) * 1e-2 * (m * n) ** 0.5 / 100)
    return torch.stack(out)


def run(method: str, params: dict, name: str, base: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, float]:
    spec = get_method(method)
    p = spec.params(**params)
    x = MergeInput(name, base + tau, base, p, [spec.model_params()] * tau.shape[0], role=role_of(name))
    t0 = time.process_time()
    out = spec.fn(x)
    return out, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x1536,2048x2048")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--spectrum", choices=["lowrank", "powerlaw"], default="lowrank")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape in a.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        name = "model.layers.0.mlp.down_proj.weight"
        base = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * 0.02
        tau = task_vectors(m, n, a.k, a.rank, a.noise, seed=m + n, spectrum=a.spectrum)
        for label in a.cases.split(","):
            method, params = CASES[label]
            exact, t_exact = run(method, {**params, "svd": "exact"}, name, base, tau)
            rand, t_rand = run(method, {**params, "svd": "randomized"}, name, base, tau)
            rel = float((rand - exact).norm() / (exact - base).norm())
            row = {"shape": shape, "case": label, "k": a.k, "spectrum": a.spectrum, "rel_diff": rel, "cpu_exact": t_exact, "cpu_randomized": t_rand,
                   "time_ratio": t_rand / t_exact}
            rows.append(row)
            print(f"{shape:10s} {label:24s} rel diff {rel:.2e}  exact {t_exact:6.2f} s  randomized {t_rand:6.2f} s  "
                  f"ratio {t_rand / t_exact:.2f}", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"k": a.k, "rank": a.rank, "noise": a.noise, "spectrum": a.spectrum, "rows": rows},
                                    indent=1))


if __name__ == "__main__":
    main()
