"""Held-out evaluation of a causal LM: target loss and multiple-choice accuracy, with
bootstrap confidence intervals over the test examples.

For each example every choice is scored by the sum of its tokens' log-probabilities
given the prompt (the tokens split as lm-evaluation-harness splits them); the
prediction is the highest-scoring choice (the harness's ``acc``). The loss is the true
target's negative log-likelihood per token, summed over the examples' target tokens
and divided by their count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lm_train import encode


def load_model(folder: Path, adapter: Path | None = None):
    """A model folder (safetensors or one .gguf), optionally with a PEFT adapter folded in."""
    from transformers import AutoModelForCausalLM

    ggufs = sorted(Path(folder).glob("*.gguf")) if Path(folder).is_dir() else []
    kw = {"gguf_file": ggufs[0].name} if ggufs and not any(Path(folder).glob("*.safetensors")) else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def score(model, tok, rows: list[dict], *, max_len: int = 96, batch_size: int = 32, bf16: bool = True) -> dict[str, np.ndarray]:
    """Per example: ``correct`` (0/1), ``nll`` (the true target's summed NLL), ``tokens``.
    ``bf16``: forward under bfloat16 autocast (about 3 times faster on this CPU), else float32."""
    seqs = []  # (example, choice, ids, target start)
    for i, r in enumerate(rows):
        for c, choice in enumerate(r["choices"]):
            ids, start = encode(tok, r["prompt"], choice, max_len)
            seqs.append((i, c, ids, max(start, 1)))
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    logp = np.zeros(len(seqs))
    ntok = np.zeros(len(seqs), dtype=np.int64)
    body, head = model.get_decoder(), model.get_output_embeddings()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b in range(0, len(order), batch_size):
        chunk = [seqs[k] for k in order[b:b + batch_size]]
        width = max(len(s[2]) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows_i, pos, tgt, owner = [], [], [], []
        for j, (_, _, seq, start) in enumerate(chunk):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
            for p in range(start, len(seq)):  # token p is predicted from position p - 1
                rows_i.append(j)
                pos.append(p - 1)
                tgt.append(seq[p])
                owner.append(j)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(hidden[torch.tensor(rows_i), torch.tensor(pos)])  # only the positions that are scored
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(tgt)[:, None])[:, 0].double().numpy()
        sums = np.zeros(len(chunk))
        np.add.at(sums, np.array(owner), lp)
        for j, k in enumerate(order[b:b + batch_size]):
            logp[k] = sums[j]
            ntok[k] = len(seqs[k][2]) - seqs[k][3]
    n = len(rows)
    scores = np.full((n, max(len(r["choices"]) for r in rows)), -np.inf)
    nll, tokens = np.zeros(n), np.zeros(n, dtype=np.int64)
    for k, (i, c, _, _) in enumerate(seqs):
        scores[i, c] = logp[k]
        if c == rows[i]["label"]:
            nll[i], tokens[i] = -logp[k], ntok[k]
    correct = (scores.argmax(1) == np.array([r["label"] for r in rows])).astype(np.float64)
    return {"correct": correct, "nll": nll, "tokens": tokens}


def summary(per: dict[str, np.ndarray]) -> dict[str, float]:
    return {"acc": float(per["correct"].mean()), "loss": float(per["nll"].sum() / max(1, per["tokens"].sum())),
            "n": int(len(per["correct"]))}


def bootstrap(per_task: dict[str, dict], *, draws: int = 2000, seed: int = 0, other: dict[str, dict] | None = None) -> dict:
    """95% percentile intervals of each task's accuracy and loss and of their means over
    tasks, resampling each task's test examples. With ``other`` (the same examples scored
    for another row) the intervals are of the paired difference self - other."""
    rng = np.random.default_rng(seed)
    acc, loss = {}, {}
    for t, p in per_task.items():
        n = len(p["correct"])
        idx = rng.integers(0, n, (draws, n))

        def stats(q):
            return q["correct"][idx].mean(1), q["nll"][idx].sum(1) / np.maximum(1, q["tokens"][idx].sum(1))

        acc[t], loss[t] = stats(p)
        if other is not None:
            a, lo = stats(other[t])
            acc[t], loss[t] = acc[t] - a, loss[t] - lo

    def ci(xs) -> list[float]:
        return [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]

    out = {t: {"acc_ci": ci(acc[t]), "loss_ci": ci(loss[t])} for t in per_task}
    out["mean"] = {"acc_ci": ci(np.mean([acc[t] for t in per_task], axis=0)),
                   "loss_ci": ci(np.mean([loss[t] for t in per_task], axis=0))}
    return out


def as_lists(per: dict[str, np.ndarray]) -> dict[str, list]:
    return {"correct": [int(x) for x in per["correct"]], "nll": [round(float(x), 5) for x in per["nll"]],
            "tokens": [int(x) for x in per["tokens"]]}


def from_lists(d: dict[str, list]) -> dict[str, np.ndarray]:
    return {"correct": np.array(d["correct"], dtype=np.float64), "nll": np.array(d["nll"]), "tokens": np.array(d["tokens"])}


def perplexity(loss: float) -> float:
    return math.exp(loss)
