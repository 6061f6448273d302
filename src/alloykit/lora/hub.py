"""LoraHub: learn the weights of a set of LoRA adapters from a few labelled examples.

Huang, Liu, Lin, Pang, Du & Lin, "LoraHub: Efficient Cross-Task Generalization via
Dynamic LoRA Composition", COLM 2024 (arXiv:2307.13269), and its reference code:

- composition: every LoRA factor is the weighted sum of the adapters' factors,
  A = sum_i w_i A_i and B = sum_i w_i B_i (so the update B A has cross terms
  w_i w_j B_i A_j; the adapters need the same rank and target modules). alloykit folds
  each adapter's scale s_i = alpha_i / r_i into its B_i, which is the paper's rule when
  the scales are equal;
- objective: the composed model's cross-entropy on the examples (mean over an example's
  output tokens, then over examples) + 0.05 * mean_i |w_i| (the reference code's L1 term
  divides the sum by the number of adapters);
- search: gradient-free, weights bounded to [-1.5, 1.5], starting at w = 0, with a budget
  of ``steps`` objective evaluations. The paper uses nevergrad's NGOpt (Shiwa); nevergrad
  is not a dependency here, so alloykit runs a seeded (1+1)-evolution strategy with the
  1/5th success rule (Rechenberg 1973): deterministic for a seed.

The composition is unchanged when every weight changes sign, so the search reports the
sign whose weights have a nonnegative sum.

``merge-lora --method lorahub`` writes the composed adapter (exact; the rank stays r).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from alloykit.errors import AlloyError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.recipe import MergeLoraDocument
from alloykit.output.adapter import store_factors

L1_STRENGTH = 0.05
BOUND = 1.5


def compose(factors: list[tuple[torch.Tensor, torch.Tensor] | None], weights: list[float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LoraHub's composition of one weight's factors: (sum_i w_i L_i, sum_i w_i R_i)."""
    present = [f for f in factors if f is not None]
    ranks = {f[0].shape[1] for f in present}
    if len(ranks) > 1:
        raise AlloyError(f"lorahub: the adapters' ranks for '{name}' differ ({sorted(ranks)}); LoraHub composes adapters of one rank")
    left = sum(w * f[0] for f, w in zip(factors, weights) if f is not None)
    right = sum(w * f[1] for f, w in zip(factors, weights) if f is not None)
    return left, right


def compose_into(cks: list[LoraCheckpoint], weights: list[float], modules: list[str], tensors: dict) -> int:
    """Write the composed adapter's lora_A/lora_B of every module into ``tensors``; returns its rank."""
    rank = 0
    for name in modules:
        left, right = compose([ck.factors(name) for ck in cks], weights, name)
        store_factors(tensors, name, left, right, layout_of(cks, name))
        if rank and right.shape[0] != rank:
            raise AlloyError(f"lorahub: '{name}' has rank {right.shape[0]}, other modules {rank}; LoraHub composes adapters of one rank")
        rank = right.shape[0]
    return rank


def layout_of(cks: list[LoraCheckpoint], name: str) -> str:
    """The PEFT layout of weight ``name`` in the first adapter that adapts it."""
    return next((ck.layout(name) for ck in cks if name in ck._deltas), "linear")


@dataclass
class Example:
    input_ids: list[int]
    output_ids: list[int]


def load_examples(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None) -> list[Example]:
    """JSON lines with {"input": str, "output": str} (tokenized with the tokenizer in
    ``tokenizer_path``) or {"input_ids": [...], "output_ids": [...]}."""
    examples, tok = [], None
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AlloyError(f"--data {path}: line {n} is not JSON; give one {{\"input\": ..., \"output\": ...}} object per line") from None
        if "input_ids" in row and "output_ids" in row:
            examples.append(Example(list(map(int, row["input_ids"])), list(map(int, row["output_ids"]))))
        elif "input" in row and "output" in row:
            if tok is None:
                tok = _tokenizer(tokenizer_path)
            examples.append(Example(tok(row["input"])["input_ids"], tok(row["output"], add_special_tokens=False)["input_ids"]))
        else:
            raise AlloyError(f"--data {path}: line {n} needs 'input' and 'output' (or 'input_ids' and 'output_ids')")
    if not examples or any(not e.output_ids for e in examples):
        raise AlloyError(f"--data {path}: give at least one example, each with a non-empty output")
    return examples


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        raise AlloyError(f"no tokenizer in '{path}' for the text examples; pass --tokenizer or give input_ids/output_ids") from None


@dataclass
class HubResult:
    weights: list[float]
    objective: float
    loss: float
    base_loss: float
    history: list[tuple[list[float], float]] = field(default_factory=list)


class _Composer:
    """The base model with the LoRA composition for given weights written into its weights."""

    def __init__(self, base: str | os.PathLike, adapters: list[str | os.PathLike]):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        cks = [LoraCheckpoint(Checkpoint(base), a, str(a)) for a in adapters]
        try:
            if any(ck._replace for ck in cks):
                raise AlloyError("lorahub: adapters with modules_to_save are not supported")
            names = sorted({n for ck in cks for n in ck._deltas})
            self.factors = {n: [ck.factors(n) for ck in cks] for n in names}
        finally:
            for ck in cks:
                ck.close()
        params = dict(self.model.named_parameters())
        self.params = {n: params[_param_name(n, params)] for n in self.factors}
        self.original = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def set(self, weights: list[float]) -> None:
        for name, fs in self.factors.items():
            left, right = compose(fs, weights, name)
            self.params[name].copy_(self.original[name] + left @ right)

    @torch.no_grad()
    def loss(self, examples: list[Example]) -> float:
        total = 0.0
        for e in examples:
            ids = torch.tensor([e.input_ids + e.output_ids])
            labels = torch.tensor([[-100] * len(e.input_ids) + e.output_ids])
            total += float(self.model(input_ids=ids, labels=labels).loss)
        return total / len(examples)


def _param_name(name: str, params: dict) -> str:
    if name in params:
        return name
    found = [p for p in params if p.endswith("." + name)]
    if len(found) != 1:
        raise AlloyError(f"lorahub: the model has no parameter '{name}' that the adapters target; is this their base model?")
    return found[0]


def lorahub_search(
    base: str | os.PathLike,
    adapters: list[str | os.PathLike],
    examples: list[Example],
    *,
    steps: int = 40,
    seed: int = 0,
    l1: float = L1_STRENGTH,
    bound: float = BOUND,
) -> HubResult:
    """Weights minimising loss + l1 * mean|w| over [-bound, bound]^K, by a seeded (1+1)-ES."""
    if steps < 1:
        raise AlloyError(f"--steps {steps}: must be at least 1")
    if len(adapters) < 1:
        raise AlloyError("lorahub: give at least one adapter")
    composer = _Composer(base, adapters)
    history: list[tuple[list[float], float]] = []

    def objective(w: np.ndarray) -> tuple[float, float]:
        composer.set([float(v) for v in w])
        loss = composer.loss(examples)
        value = loss + l1 * float(np.abs(w).mean())
        history.append(([float(v) for v in w], value))
        return value, loss

    rng = np.random.default_rng(seed)
    x = np.zeros(len(adapters))
    fx, loss_x = objective(x)
    base_loss = loss_x
    sigma = bound / 3
    for _ in range(steps - 1):
        y = np.clip(x + sigma * rng.standard_normal(len(x)), -bound, bound)
        fy, loss_y = objective(y)
        if fy < fx:
            x, fx, loss_x = y, fy, loss_y
            sigma *= math.exp(1 / 3)  # 1/5th rule: stationary at a success rate of 1/5
        else:
            sigma *= math.exp(-1 / 12)
    if x.sum() < 0:  # (sum -w B)(sum -w A) = (sum w B)(sum w A): report the sign with a nonnegative sum
        x = -x
    return HubResult([float(v) for v in x], fx, loss_x, base_loss, history)


def write_recipe(path: str | os.PathLike, base: str | os.PathLike, adapters: list[str | os.PathLike], result: HubResult,
                 steps: int, seed: int) -> Path:
    """A merge-lora recipe that ``alloykit merge-lora --recipe FILE OUT`` runs."""
    doc = {
        "merge_lora": {
            "base": str(Path(base).absolute()),
            "adapters": [str(Path(a).absolute()) for a in adapters],
            "method": "lorahub",
            "weights": [round(w, 6) for w in result.weights],
        },
        "lorahub": {"steps": steps, "seed": seed, "loss": round(result.loss, 6), "objective": round(result.objective, 6),
                    "base_loss": round(result.base_loss, 6)},
    }
    MergeLoraDocument.model_validate(doc)  # what merge-lora --recipe will read
    path = Path(path)
    path.write_text("# written by 'alloykit lorahub'; run it with: alloykit merge-lora --recipe "
                    f"{path.name} OUT\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
