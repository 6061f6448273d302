"""PCB-merging and WUDI-merging: golden values on hand-constructed cases, solver agreement."""

from __future__ import annotations

import math

import pytest
import torch

from alloykit.methods import get_method
from alloykit.methods.interference import wudi_adam, wudi_closed_form, wudi_system
from alloykit.methods.registry import MergeInput


def run(name, tensors, base, shared=None, tensor_name="layers.0.mlp.up_proj.weight"):
    spec = get_method(name)
    tensors = torch.as_tensor(tensors, dtype=torch.float32)
    base = torch.as_tensor(base, dtype=torch.float32)
    mps = [spec.model_params.model_validate({}) for _ in range(tensors.shape[0])]
    return spec.fn(MergeInput(tensor_name, tensors, base, spec.params.model_validate(shared or {}), mps))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registered_with_paper_and_formula():
    for name in ("pcb", "wudi"):
        spec = get_method(name)
        assert "arXiv:" in spec.paper and "arXiv:" in spec.doc and "merged" in spec.doc


# ----------------------------------------------------------------------------- PCB


def test_pcb_two_disjoint_tasks_by_hand():
    """tau_1 = [1, 0], tau_2 = [0, 2]: every quantity has a closed form in e."""
    base = torch.tensor([0.5, -1.0])
    out = run("pcb", base + torch.tensor([[1.0, 0.0], [0.0, 2.0]]), base, {"density": 1.0})
    e2 = math.exp(2)
    # Norm(tau_i^2) is [1, 0] / [0, 1]; intra = softmax(2 * that); inter = softmax(Norm(tau_i^2)) + uniform
    # (tau_1 * tau_2 = 0). Entry 0: beta_1 = e^2/(e^2+1) * (e/(e+1) + 1/2), beta_2 = 1/(e^2+1) * (1/(e+1) + 1/2)
    beta_1 = e2 / (e2 + 1) * (math.e / (math.e + 1) + 0.5)
    beta_2 = 1 / (e2 + 1) * (1 / (math.e + 1) + 0.5)
    t0 = beta_1 * 1.0 / (beta_1 + beta_2)
    t1 = beta_1 * 2.0 / (beta_1 + beta_2)  # symmetric: task 2 plays task 1's part on entry 1
    torch.testing.assert_close(out - base, torch.tensor([t0, t1]), atol=1e-6, rtol=1e-6)


def _pcb_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    """The paper's equations written out entry by entry in float64 (independent of the module)."""
    tau = tau.double()
    k, d = tau.shape

    def norm(v):
        lo, hi = min(v), max(v)
        return [0.0 if hi == lo else (a - lo) / (hi - lo) for a in v]

    def softmax(v):
        z = sum(math.exp(a) for a in v)
        return [math.exp(a) / z for a in v]

    betas = []
    for i in range(k):
        ti = tau[i].tolist()
        intra = softmax([k * a for a in norm([a * a for a in ti])])
        inter = [0.0] * d
        for j in range(k):
            s = softmax(norm([a * b for a, b in zip(ti, tau[j].tolist())]))
            inter = [a + b for a, b in zip(inter, s)]
        beta = [a * b for a, b in zip(intra, inter)]
        thr = sorted(beta)[min(d - 1, int((1 - density) * d))]
        betas.append([b if b >= thr else 0.0 for b in beta])
    merged = []
    for p in range(d):
        den = sum(betas[i][p] for i in range(k))
        merged.append(0.0 if den == 0 else sum(betas[i][p] * tau[i, p].item() for i in range(k)) / den)
    return torch.tensor(merged)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_pcb_matches_the_papers_equations(density):
    base = rand(4, 5, seed=1)
    tau = 0.1 * rand(3, 4, 5, seed=2)
    out = run("pcb", base + tau, base, {"density": density, "lambda": 1.5})
    want = base + 1.5 * _pcb_reference(tau.reshape(3, -1), density).float().view(4, 5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_pcb_single_task_is_magnitude_pruning():
    """K = 1: the scores rise with |tau|, the weights cancel, so density r keeps the top-r |tau| entries."""
    base = rand(10, seed=3)
    tau = torch.tensor([0.3, -0.9, 0.1, 0.5, -0.2, 0.05, 0.7, -0.4, 0.15, -0.6])
    out = run("pcb", (base + tau)[None], base, {"density": 0.3}, tensor_name="bias")
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[1, 6, 9]] = True  # |tau| 0.9, 0.7, 0.6
    torch.testing.assert_close(out - base, torch.where(keep, tau, 0.0), atol=1e-6, rtol=1e-5)
    full = run("pcb", (base + tau)[None], base, {"density": 1.0}, tensor_name="bias")
    torch.testing.assert_close(full, base + tau, atol=1e-6, rtol=1e-5)


def test_pcb_density_bounds_the_kept_entries():
    base = torch.zeros(100)
    tau = rand(2, 100, seed=4)
    out = run("pcb", base + tau, base, {"density": 0.1}, tensor_name="bias")
    # each task keeps 10 entries: at most 20 entries of the merge are non-zero, at least 10
    nonzero = int((out != 0).sum())
    assert 10 <= nonzero <= 20


# ----------------------------------------------------------------------------- WUDI


def wudi_loss(m: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The paper's objective, straight from its definition."""
    return sum(((m - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in tau)


def test_wudi_system_is_the_loss_gradient():
    tau = rand(3, 6, 4, seed=5).double()
    m = rand(6, 4, seed=6).double().requires_grad_(True)
    wudi_loss(m, tau).backward()
    g, b = wudi_system(tau)
    torch.testing.assert_close(m.grad, 2 * (m.detach() @ g - b))


def test_wudi_closed_form_satisfies_the_normal_equations():
    tau = 0.1 * rand(3, 8, 5, seed=7)
    m = wudi_closed_form(tau, ridge=0.0).double()
    g, b = wudi_system(tau)
    torch.testing.assert_close(m @ g, b, atol=1e-6, rtol=1e-4)
    # and it is the minimum: nudging it raises the loss
    base_loss = wudi_loss(m, tau.double())
    for seed in range(3):
        assert wudi_loss(m + 1e-3 * rand(8, 5, seed=seed).double(), tau.double()) > base_loss


def test_wudi_disjoint_input_subspaces_give_the_sum():
    """Tasks reading disjoint input coordinates do not interfere: the minimiser is sum_i tau_i."""
    tau = torch.zeros(2, 5, 4)
    tau[0, :, :2] = rand(5, 2, seed=8)
    tau[1, :, 2:] = rand(5, 2, seed=9)
    base = rand(5, 4, seed=10)
    for solver in ("closed_form", "adam"):
        out = run("wudi", base + tau, base, {"solver": solver, "ridge": 0.0})
        torch.testing.assert_close(out, base + tau.sum(0), atol=1e-5, rtol=1e-5)


def test_wudi_single_task_returns_it():
    tau = rand(1, 6, 3, seed=11)
    base = rand(6, 3, seed=12)
    out = run("wudi", base + tau, base, {"solver": "closed_form"})
    torch.testing.assert_close(out, base + tau[0], atol=1e-4, rtol=1e-4)


def test_wudi_adam_converges_to_the_closed_form():
    tau = 0.1 * rand(3, 8, 5, seed=13)
    exact = wudi_closed_form(tau, ridge=0.0)
    approx = wudi_adam(tau, steps=4000, lr=1e-3)
    torch.testing.assert_close(approx, exact, atol=2e-4, rtol=1e-3)
    start = tau.sum(0)
    assert (approx - exact).norm() < 1e-2 * (start - exact).norm()


def test_wudi_adam_steps_are_torch_adam():
    """The hand-written Adam equals torch.optim.Adam on the autograd loss (the reference code's loop)."""
    tau = 0.05 * rand(3, 7, 4, seed=14)
    param = torch.nn.Parameter(tau.sum(0).clone())
    opt = torch.optim.Adam([param], lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        wudi_loss(param, tau).backward()
        opt.step()
    torch.testing.assert_close(wudi_adam(tau, steps=20, lr=1e-3), param.detach(), atol=1e-6, rtol=1e-5)


def test_wudi_default_solver_moves_toward_the_minimum():
    tau = 0.01 * rand(3, 8, 5, seed=15)
    start, stepped = tau.sum(0), wudi_adam(tau, steps=300, lr=1e-5)
    assert wudi_loss(stepped, tau) < wudi_loss(start, tau)
    assert float((stepped - start).abs().max()) <= 300 * 1e-5 * 1.01  # Adam's step is bounded by lr


@pytest.mark.parametrize("tensor_name,shape", [("layers.0.input_layernorm.weight", (6,)),
                                               ("model.embed_tokens.weight", (7, 4))])
def test_wudi_fallback_is_base_plus_mean(tensor_name, shape):
    base = rand(*shape, seed=16)
    tensors = base + rand(3, *shape, seed=17)
    out = run("wudi", tensors, base, {"solver": "closed_form"}, tensor_name=tensor_name)
    torch.testing.assert_close(out, tensors.mean(0), atol=1e-6, rtol=1e-6)


def near_singular_tasks() -> torch.Tensor:
    """Four [24, 96] task matrices whose rows share a 12-dimensional input subspace, plus 1e-5 of
    task-specific noise: G's condition number is about 1e15, like an FFN output matrix (384 x 1536)
    of four real MiniLM fine-tunes (issue 16: 5.8e12)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(12, 96, generator=g)
    return torch.stack([0.01 * (torch.randn(24, 12, generator=g) @ shared + 1e-5 * torch.randn(24, 96, generator=g))
                        for _ in range(4)])


def test_wudi_closed_form_default_is_sound_on_near_singular_systems():
    tau = near_singular_tasks()
    g, _ = wudi_system(tau)
    eig = torch.linalg.eigvalsh(g)
    assert float(eig.max() / eig.min().abs().clamp_min(1e-300)) > 1e12  # the input is as ill-conditioned as claimed
    start = tau.sum(0)
    exact = wudi_closed_form(tau, ridge=0.0)  # the unregularised solve blows up along the near-null directions
    assert float(exact.norm() / start.norm()) > 100
    default = run("wudi", tau, torch.zeros(24, 96), {"solver": "closed_form"})
    assert float(default.norm() / start.norm()) < 1.0  # bounded: no amplification of the noise directions
    # and it does what WUDI asks within the tasks' subspace: far less interference than sum_i tau_i or Adam
    assert wudi_loss(default.double(), tau.double()) < 0.5 * wudi_loss(start.double(), tau.double())
    assert wudi_loss(default.double(), tau.double()) < wudi_loss(wudi_adam(tau, 300, 1e-5).double(), tau.double())
    # insensitive to the ridge over two decades: the solution is determined by the well-conditioned directions
    for ridge in (1e-3, 0.1):
        other = wudi_closed_form(tau, ridge)
        assert float((other - default).norm() / default.norm()) < 0.02


def test_wudi_closed_form_ridge_pulls_toward_the_sum_of_task_vectors():
    """M = (B + eps M0)(G + eps I)^-1 with M0 = sum_i tau_i, eps = ridge * trace(G) / in, by hand; a huge ridge gives M0."""
    tau = 0.1 * rand(3, 6, 4, seed=18).double()
    g, b = wudi_system(tau)
    eps = 0.3 * float(g.trace()) / 4
    want = (b + eps * tau.sum(0)) @ torch.linalg.inv(g + eps * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(wudi_closed_form(tau, 0.3), want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(wudi_closed_form(tau.float(), 1e9), tau.sum(0).float(), atol=1e-6, rtol=1e-5)
