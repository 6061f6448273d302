"""Linear mode connectivity: loss and accuracy along theta(alpha) = (1 - alpha) theta_A + alpha theta_B.

The barrier (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis"; Entezari et al. 2022) is the largest rise of the path above the straight
line between the endpoints' values:

    loss barrier     = max_alpha  L(theta(alpha)) - [(1 - alpha) L(theta_A) + alpha L(theta_B)]
    accuracy barrier = max_alpha  [(1 - alpha) acc(theta_A) + alpha acc(theta_B)] - acc(theta(alpha))

(the accuracy barrier is the error barrier; REPAIR and Git Re-Basin report it in accuracy
points). Zero means the endpoints are linearly connected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Evaluate = Callable[[nn.Module], tuple[float, float]]


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) a + alpha b for floating-point tensors; integer buffers are a's."""
    return {k: torch.lerp(v.float(), b[k].float(), alpha).to(v.dtype) if v.is_floating_point() else v for k, v in a.items()}


def barrier(alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """Largest gap between the path and the line through its endpoints (alphas run from 0 to 1)."""
    if len(alphas) < 2 or alphas[0] != 0 or alphas[-1] != 1:
        raise ValueError("a barrier needs values at alpha = 0 and alpha = 1")
    v0, v1 = values[0], values[-1]
    gaps = [((1 - a) * v0 + a * v1) - v if higher_is_better else v - ((1 - a) * v0 + a * v1)
            for a, v in zip(alphas, values)]
    return max(gaps)


def alphas_for(steps: int) -> list[float]:
    if steps < 2:
        raise ValueError("the path needs at least 2 points")
    return [i / (steps - 1) for i in range(steps)]


def path(model_a: nn.Module, model_b: nn.Module, evaluate: Evaluate, *, steps: int = 11,
         adjust: Callable[[nn.Module, float], None] | None = None,
         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the models on the linear path from ``model_a`` (alpha 0) to ``model_b`` (alpha 1).

    ``evaluate(module) -> (loss, accuracy)``; ``adjust(module, alpha)`` runs on each
    interpolated model before it is evaluated (e.g. REPAIR). Returns alphas, losses,
    accuracies and both barriers.
    """
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a).eval()
    alphas = alphas_for(steps)
    losses, accs = [], []
    for alpha in alphas:
        probe.load_state_dict(interpolate(sd_a, sd_b, alpha))
        if adjust is not None and 0 < alpha < 1:
            adjust(probe, alpha)
        loss, acc = evaluate(probe)
        losses.append(loss)
        accs.append(acc)
        if progress:
            progress(f"lmc: alpha {alpha:.2f}: loss {loss:.4f}, accuracy {acc:.4f}")
    return {"alpha": alphas, "loss": losses, "accuracy": accs,
            "loss_barrier": barrier(alphas, losses), "accuracy_barrier": barrier(alphas, accs, higher_is_better=True)}


def classifier_evaluator(batches: Sequence[tuple[Any, torch.Tensor]]) -> Evaluate:
    """Mean cross-entropy and accuracy over (inputs, labels) batches; inputs a tensor or keyword dict."""
    batches = list(batches)

    def evaluate(module: nn.Module) -> tuple[float, float]:
        nll = correct = total = 0.0
        with torch.no_grad():
            for inputs, labels in batches:
                out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
                logits = getattr(out, "logits", out)
                nll += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += float((logits.argmax(-1) == labels).sum())
                total += len(labels)
        return nll / total, correct / total

    return evaluate


def causal_lm_evaluator(batches: Sequence[dict[str, torch.Tensor]]) -> Evaluate:
    """Mean next-token negative log-likelihood and next-token accuracy over padded token batches."""
    batches = list(batches)

    def evaluate(module: nn.Module) -> tuple[float, float]:
        nll = correct = total = 0.0
        with torch.no_grad():
            for b in batches:
                logits = module(**b).logits[:, :-1].float()
                target, mask = b["input_ids"][:, 1:], (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
                logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
                nll -= float(logp[mask].sum())
                correct += float((logits.argmax(-1) == target)[mask].sum())
                total += float(mask.sum())
        return nll / max(total, 1), correct / max(total, 1)

    return evaluate


def accuracy_stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n examples."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / max(n, 1))
