"""The starting point of docs/data-dependent.md's worked example: a user's two fine-tuned classifiers and their data.

Writes into OUT (default .bench/user-tasks):

* gloss-{train,val,test}.jsonl: WordNet glosses, "noun" or "verb"; fortune-{train,val,test}.jsonl: fortunes,
  "en" or "de" (Debian wordnet-base, fortunes, fortunes-de) -- standing in for data a user wrote;
* ft-gloss/, ft-fortune/: all-MiniLM-L6-v2 fine-tuned as BertForSequenceClassification on each (transformers
  only, as a user would; the tokenizer saved beside the weights).

    nice -n 15 python benchmarks/user_tasks/make_finetunes.py --steps 120     # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from alloykit.eval import data as D  # noqa: E402
from alloykit.eval.model import base_model_path  # noqa: E402

SIZES = {"train": 2000, "val": 200, "test": 500}


def gloss_rows() -> list[dict]:
    return [{"text": g, "label": {"n": "noun", "v": "verb"}[t]} for pos in ("noun", "verb")
            for g, _, t in D.wordnet_synsets(pos)]


def fortune_rows() -> list[dict]:
    return [{"text": t, "label": lang} for lang in ("en", "de") for f in D.package_files(D.FORTUNE_LANGUAGES[lang])
            for t in D.read_fortunes(f)]


def write_splits(out: Path, name: str, rows: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    n = sum(SIZES.values()) // 2
    balanced = [r for group in by_label.values() for r in rng.sample(group, n)]
    rng.shuffle(balanced)
    start = 0
    for split, size in SIZES.items():
        (out / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in balanced[start:start + size]))
        start += size


def finetune(out: Path, name: str, labels: list[str], steps: int, seed: int) -> float:
    tok = AutoTokenizer.from_pretrained(base_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(), num_labels=2, id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    rows = [json.loads(line) for line in (out / f"{name}-train.jsonl").read_text().splitlines()]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        batch = random.Random(seed * 100_000 + step).sample(rows, 16)
        enc = tok([r["text"] for r in batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([model.config.label2id[r["label"]] for r in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0:
            print(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    model.save_pretrained(out / f"ft-{name}")
    tok.save_pretrained(out / f"ft-{name}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".bench/user-tasks")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_splits(out, "gloss", gloss_rows(), 0)
    write_splits(out, "fortune", fortune_rows(), 1)
    for i, (name, labels) in enumerate((("gloss", ["noun", "verb"]), ("fortune", ["en", "de"]))):
        secs = finetune(out, name, labels, args.steps, i)
        print(f"fine-tuned {name}: {args.steps} steps in {secs:.0f}s -> {out / f'ft-{name}'}")


if __name__ == "__main__":
    main()
