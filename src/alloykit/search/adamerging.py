"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled inputs.

Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"
(arXiv:2310.02575). With task vectors tau_k = theta_k - theta_0:

    task-wise:   theta   = theta_0   + sum_k lambda_k   tau_k
    layer-wise:  theta_l = theta_0,l + sum_k lambda_k,l tau_k,l

lambda minimises sum_t H(f_theta(x_t)), the mean Shannon entropy of the merged model's
predictions on unlabelled inputs x_t of each task t, with Adam; lambda starts at 0.3
(the paper's prior) and is clamped to [lo, hi] after every step. "Layer" is, as in the
paper's code, each parameter tensor (one coefficient per model per tensor): a Llama
block has nine, a BERT block sixteen; embeddings, norms and heads get their own.

The merged model is never materialised as a module: ``torch.func.functional_call``
runs the base module with the parameters base + sum_k lambda_k tau_k, so gradients
reach lambda only. Memory: the module (whose weights are theta_0), K task vectors, one
merged copy kept for the backward pass, plus activations: about (K + 2) x 4 bytes per
parameter in fp32. MiniLM (22.7M parameters) with 6 task vectors: under 1 GB; a
Llama-7B with 3 task vectors: about 140 GB, a job for a large accelerator (bf16 halves
it), not for a laptop.

The result is an ordinary ``task_arithmetic`` recipe (lambda 1, normalize off) whose
per-model ``weight`` is the learned number (task-wise) or, layer-wise, one
``{filter: TENSOR NAME, value: lambda}`` entry per tensor, longest names first so that
the first substring match is always the tensor's own entry; tensors that are not
parameters of the module (buffers) get 0, i.e. keep the base's value, as in the search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from alloykit.errors import AlloyError
from alloykit.eval.model import mean_pool
from alloykit.eval.suite import TaskSuite
from alloykit.progress import Progress

GRANULARITIES = ("task", "layer")


class Objective(Protocol):
    """Unlabelled inputs of one or more tasks, and the merged model's prediction entropy on them."""

    names: list[str]  # one per task (or data file)

    def size(self, task: int) -> int:
        """How many unlabelled inputs task ``task`` has."""
        ...

    def entropy(self, params: dict[str, torch.Tensor], task: int, idx: torch.Tensor) -> torch.Tensor:
        """Mean prediction entropy (nats) of the model with ``params`` on inputs ``idx`` of ``task``."""
        ...


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = -sum_c p_c log p_c per row, in nats (computed from log_softmax: no log 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class TaskVectorModel:
    """theta_0 and the stacked task vectors [K, ...] of every merged parameter tensor."""

    def __init__(self, base: dict[str, torch.Tensor], finetuned: Sequence[Callable[[str], torch.Tensor]]):
        """``base``: name -> theta_0 (shared with the module, not copied); ``finetuned``: one reader per model."""
        self.base = base
        self.names = list(base)
        self.k = len(finetuned)
        # theta_k - theta_0 in fp32, computed as alloykit's task_arithmetic computes it
        self.taus = {n: torch.stack([read(n).float() for read in finetuned]) - base[n].float().unsqueeze(0)
                     for n in self.names}

    def groups(self, granularity: str) -> list[str]:
        if granularity not in GRANULARITIES:
            raise AlloyError(f"granularity '{granularity}': use one of {', '.join(GRANULARITIES)}")
        return ["all"] if granularity == "task" else list(self.names)

    def params(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta_0 + sum_k lambda_k tau_k for every tensor; ``coefficients`` is [K, 1] or [K, n_tensors].

        The operations and their order are those of alloykit's task_arithmetic (multiply,
        sum over models, add the base), so the recipe's merge equals this bit for bit.
        """
        out = {}
        for g, n in enumerate(self.names):
            tau = self.taus[n]
            col = coefficients[:, g if coefficients.shape[1] > 1 else 0].reshape((self.k,) + (1,) * (tau.dim() - 1))
            out[n] = self.base[n] + (tau * col).sum(0)
        return out


@dataclass
class SearchResult:
    coefficients: torch.Tensor  # [K, G]
    groups: list[str]
    granularity: str
    entropy_init: float
    entropy_final: float
    per_task_final: list[float]
    history: list[float] = field(default_factory=list)  # summed batch entropy at each step
    settings: dict[str, Any] = field(default_factory=dict)

    def model_weight(self, k: int) -> Any:
        """Model k's recipe ``weight``: a number, or per-tensor filters (longest name first, exact)."""
        if self.granularity == "task":
            return float(self.coefficients[k, 0])
        entries = sorted(zip(self.groups, self.coefficients[k].tolist()), key=lambda e: -len(e[0]))
        return [{"filter": n, "value": float(v)} for n, v in entries] + [{"value": 0.0}]


@torch.no_grad()
def total_entropy(tv: TaskVectorModel, objective: Objective, coefficients: torch.Tensor,
                  batch_size: int) -> list[float]:
    """Mean entropy over every input of each task (in batches), at ``coefficients``."""
    params = tv.params(coefficients)
    out = []
    for t in range(len(objective.names)):
        n, acc = objective.size(t), 0.0
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            acc += float(objective.entropy(params, t, idx)) * len(idx)
        out.append(acc / max(n, 1))
    return out


def adamerging(tv: TaskVectorModel, objective: Objective, *, granularity: str = "task", steps: int = 500,
               lr: float = 1e-3, init: float = 0.3, clamp: tuple[float, float] = (0.0, 1.0), batch_size: int = 16,
               seed: int = 0, log: Callable[[str], None] | None = None) -> SearchResult:
    """Learn lambda by Adam on the summed per-task batch entropy (one batch per task per step)."""
    lo, hi = clamp
    if lo > hi:
        raise AlloyError(f"clamp [{lo}, {hi}]: the lower bound exceeds the upper; give --clamp LO HI with LO <= HI")
    if steps < 0 or batch_size < 1 or not math.isfinite(lr) or lr <= 0:
        raise AlloyError(f"steps {steps}, batch size {batch_size}, lr {lr}: need steps >= 0, batch size >= 1, lr > 0")
    groups = tv.groups(granularity)
    lam = torch.full((tv.k, len(groups)), float(init)).clamp_(lo, hi).requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sizes = [objective.size(t) for t in range(len(objective.names))]
    h0 = sum(total_entropy(tv, objective, lam.detach(), batch_size))
    history = []
    prog = Progress("adamerging", steps, log, unit="steps")  # a bar, or lines through ``log``
    for step in range(steps):
        loss = torch.zeros(())
        params = tv.params(lam)
        for t, n in enumerate(sizes):
            idx = torch.randperm(n, generator=gen)[:batch_size]
            loss = loss + objective.entropy(params, t, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(lo, hi)
        history.append(float(loss.detach()))
        prog.update(1)
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: batch entropy {history[-1]:.4f}")
    final = total_entropy(tv, objective, lam.detach(), batch_size)
    return SearchResult(lam.detach().clone(), groups, granularity, h0, sum(final), final, history,
                        dict(steps=steps, lr=lr, init=init, clamp=[lo, hi], batch_size=batch_size, seed=seed))


# -- objectives ----------------------------------------------------------------------------------
class SuiteEntropy:
    """The tasks of a :class:`~alloykit.eval.suite.TaskSuite` on the unlabelled inputs of one split: the
    entropy of each task's head on its own task's inputs (classifiers), or of the next-token
    distribution at every real position (causal LMs). Parameters are keyed like the checkpoints."""

    def __init__(self, suite: TaskSuite, split: str = "validation", samples: int | None = None):
        self.suite, self.names = suite, suite.names
        self.data = [suite.encoded(n, split, samples) for n in self.names]  # ids only: labels are never read

    def size(self, task: int) -> int:
        return len(self.data[task])

    def entropy(self, params, task, idx):
        b = self.suite.bound[task]
        ids, mask = self.data[task].batch(idx)
        h = softmax_entropy(b.net.logits(ids, mask, params))
        if not b.next_token:
            return h.mean()
        m = mask.to(h.dtype)
        return (h * m).sum() / m.sum()


class HeadEntropy:
    """The quality benchmark's encoders (mean-pooled) with one linear head per task: entropy of each head
    on its task's inputs."""

    def __init__(self, encoder: torch.nn.Module, heads: list[torch.nn.Linear], data: list, names: list[str]):
        self.encoder, self.heads, self.data, self.names = encoder, heads, data, names
        for h in heads:
            h.requires_grad_(False)  # fixed: gradients go to the coefficients only

    def size(self, task: int) -> int:
        return len(self.data[task])

    def entropy(self, params, task, idx):
        ids, mask = self.data[task].batch(idx)
        hidden = torch.func.functional_call(self.encoder, params, (), {"input_ids": ids, "attention_mask": mask})
        return softmax_entropy(self.heads[task](mean_pool(hidden.last_hidden_state, mask))).mean()
