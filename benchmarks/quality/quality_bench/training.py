"""One fine-tuning loop for both tracks: a shared encoder, one new linear head per task.

With one task this is the ordinary fine-tune; with several, each step takes one batch of
one task, round robin (the multi-task baseline). A track supplies the encoder, how to
turn a batch of inputs into features, and its data; everything random comes from
generators seeded by the recipe's seed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from alloykit.eval.model import new_head


class Data(Protocol):
    """A split of one task: labels, and the model inputs of any rows."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor) -> Any: ...

    def head(self, n: int) -> "Data": ...


Features = Callable[[nn.Module, Any], torch.Tensor]  # (encoder, batch inputs) -> [B, hidden]


@dataclass(frozen=True)
class Recipe:
    """A seeded fine-tuning recipe: AdamW, warmup then decay, gradient clipping at 1."""

    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    decay: str = "linear"  # or "cosine"
    #: parameters whose name contains one of these stay frozen (e.g. the text track's word embeddings)
    freeze: tuple[str, ...] = ()
    #: text only: tokens per example
    max_len: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Resumable:
    """A training loop's whole state saved every ``every`` steps (tensors, numbers and RNG states only;
    read back with ``weights_only=True``), so that a run stopped midway continues where it stopped
    and ends with the same weights as an uninterrupted one. ``path`` None: no checkpoints."""

    def __init__(self, path: Path | None, every: int = 50):
        self.path, self.every = path, every

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, step: int, state: Callable[[], dict]) -> None:
        if self.path is None or step % self.every:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"step": step, **state()}, tmp)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: float, decay: str):
    """Linear warmup over ``warmup`` of the steps, then linear or cosine decay to zero."""
    warm = max(1, int(warmup * steps))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        frac = min(1.0, (s - warm) / max(1, steps - warm))
        return 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(encoder: nn.Module, features: Features, data: dict[str, Data], n_classes: dict[str, int], recipe: Recipe, *,
          seed: int, steps: int | None = None, hidden: int, log: Callable[[str], None] | None = None,
          checkpoint: Path | None = None) -> dict[str, nn.Linear]:
    """Fine-tune ``encoder`` in place with one new head per task of ``data``; return the heads.
    ``checkpoint``: a file the loop's state is saved to every 50 steps and resumed from."""
    steps = steps or recipe.steps
    torch.manual_seed(seed)  # dropout, if the encoder has any
    g = torch.Generator().manual_seed(seed)
    names = list(data)
    heads = {t: new_head(hidden, n_classes[t], seed * 1000 + i) for i, t in enumerate(names)}
    params = [(n, p) for n, p in encoder.named_parameters() if not any(f in n for f in recipe.freeze)]
    for n, p in encoder.named_parameters():
        p.requires_grad_(not any(f in n for f in recipe.freeze))
    groups = [{"params": [p for n, p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0},
              {"params": [p for h in heads.values() for p in h.parameters()], "lr": recipe.head_lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=recipe.lr)
    sched = schedule(opt, steps, recipe.warmup, recipe.decay)
    queues = {t: torch.empty(0, dtype=torch.long) for t in names}
    t0, loss_avg, start = time.monotonic(), None, 0
    saver = Resumable(checkpoint)
    state = saver.load()
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        for t in names:
            heads[t].load_state_dict(state["heads"][t])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["g"])
        torch.set_rng_state(state["rng"])
        queues, loss_avg, start = state["queues"], state["loss_avg"], state["step"]
        if log:
            log(f"    resumed at step {start}/{steps} from {checkpoint}")
    encoder.train()
    try:
        for step in range(start, steps):
            task = names[step % len(names)]
            if len(queues[task]) < recipe.batch_size:  # a fresh seeded permutation each epoch
                queues[task] = torch.cat([queues[task], torch.randperm(len(data[task]), generator=g)])
            idx, queues[task] = queues[task][:recipe.batch_size], queues[task][recipe.batch_size:]
            loss = F.cross_entropy(heads[task](features(encoder, data[task].batch(idx))), data[task].labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            sched.step()
            value = float(loss.detach())
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            if log and (step + 1) % max(1, steps // 4) == 0:
                log(f"    step {step + 1}/{steps}  loss {loss_avg:.3f}  {(time.monotonic() - t0) / (step + 1 - start):.3f}s/step")
            saver.save(step + 1, lambda: {"encoder": encoder.state_dict(), "heads": {t: h.state_dict() for t, h in heads.items()},
                                          "opt": opt.state_dict(), "sched": sched.state_dict(), "g": g.get_state(),
                                          "rng": torch.get_rng_state(), "queues": queues, "loss_avg": loss_avg})
    finally:
        encoder.requires_grad_(True)
        encoder.eval()
    saver.finish()
    for h in heads.values():
        h.eval()
    return heads
