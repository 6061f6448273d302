"""Alignment of BERT-shaped encoders trained here from scratch, from different seeds, on the
benchmark's WordNet noun-supersense task (Debian wordnet-base; 26 classes).

Two `BertForSequenceClassification` models (MiniLM's tokenizer, hidden 128, 2 layers,
4 heads, MLP 512) are trained from random initialisations that differ only in the seed
(initialisation and data order), saved as ordinary model folders, then compared with the
user-facing command:

    alloykit analyze --lmc A B --task wordnet_noun --calibration calib.txt \
        --align weight_matching activation_matching --repair --out docs/alignment/text-bert

    nice -n 15 python benchmarks/alignment/text.py [--steps 3000] [--hidden 128]

Models and data are cached under .bench/alignment/text (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, DOCS, cpu_seconds, environment, log  # noqa: E402

from alloykit.cli.main import main as alloykit  # noqa: E402
from alloykit.eval.model import base_model_path, load_tokenizer  # noqa: E402
from alloykit.eval.tasks import get_task  # noqa: E402

TASK = "wordnet_noun"


def model_config(hidden: int, n_classes: int, vocab: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=n_classes,
                      architectures=["BertForSequenceClassification"])


def train(folder: Path, splits, tok, *, hidden: int, seed: int, steps: int, batch_size: int = 32, lr: float = 5e-4) -> dict:
    from transformers import BertForSequenceClassification

    n_classes = max(splits.train.labels) + 1
    torch.manual_seed(seed)
    model = BertForSequenceClassification(model_config(hidden, n_classes, len(tok)))
    enc = tok(splits.train.texts, truncation=True, max_length=32)
    ids, labels = enc["input_ids"], splits.train.labels
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    warm = steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    rng = random.Random(seed)
    order: list[int] = []
    t0, c0, avg = time.monotonic(), cpu_seconds(), None
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(ids)))
            rng.shuffle(more)
            order += more
        batch, order = order[:batch_size], order[batch_size:]
        width = max(len(ids[i]) for i in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, i in enumerate(batch):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        logits = model(input_ids=x, attention_mask=mask).logits
        loss = F.cross_entropy(logits, torch.tensor([labels[i] for i in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = float(loss.detach()) if avg is None else 0.98 * avg + 0.02 * float(loss.detach())
        if (step + 1) % max(1, steps // 20) == 0:
            log(f"    seed {seed} step {step + 1}/{steps}: loss {avg:.3f} ({(time.monotonic() - t0) / (step + 1):.2f} s/step)")
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "hidden": hidden,
            "seconds": round(time.monotonic() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    (folder / "training.json").write_text(json.dumps(info, indent=1))
    return info


RECIPE = """merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


def recipes(folders: list[Path], calib: Path, root: Path) -> dict:
    """The recipe step on the trained pair: plain average, aligned average, aligned average + REPAIR."""
    from alloykit.align.compare import suite_evaluator
    from alloykit.eval.loading import load_model, model_folder
    from alloykit.eval.suite import TaskSuite
    from alloykit.eval.taskfile import resolve_tasks

    variants = {"linear": "", "linear + align": "align: {method: weight_matching}\n",
                "linear + align + repair": f"align: {{method: weight_matching, repair: true, data: {calib}}}\n",
                "linear + align (activations) + repair":
                    f"align: {{method: activation_matching, repair: true, data: {calib}}}\n"}
    out = {}
    for name, extra in variants.items():
        slug = name.replace(" + ", "-").replace(" (", "-").replace(")", "")
        recipe = root / f"recipe-{slug}.yaml"
        recipe.write_text(RECIPE.format(a=folders[0], b=folders[1]) + extra)
        merged = root / f"merged-{slug}"
        t0, c0 = time.monotonic(), cpu_seconds()
        alloykit(["merge", str(recipe), str(merged), "--overwrite", "-q"])
        seconds, cpu = round(time.monotonic() - t0, 1), round(cpu_seconds() - c0, 1)
        loaded = load_model(model_folder(merged))
        evaluate, n = suite_evaluator(TaskSuite(loaded, resolve_tasks([TASK]), head_option=False), "test", 1000, 32)
        loss, acc = evaluate(loaded.module)
        out[name] = {"recipe": recipe.read_text(), "loss": loss, "accuracy": acc,
                     "stderr": math.sqrt(acc * (1 - acc) / n), "merge_seconds": seconds, "merge_cpu_seconds": cpu}
        log(f"recipe '{name}': test accuracy {100 * acc:.2f}%, loss {loss:.4f} ({seconds}s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--recipes-only", action="store_true", help="only the recipe-step merges (models trained already)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = CACHE / "text"
    root.mkdir(parents=True, exist_ok=True)
    splits = get_task(TASK).splits(seed=0)
    tok = load_tokenizer(base_model_path())
    calib = root / f"{TASK}-calibration.txt"
    calib.write_text("".join(t.replace("\n", " ") + "\n" for t in splits.train.texts[:512]))
    folders = []
    for seed in args.seeds:
        folder = root / f"bert-h{args.hidden}-s{args.steps}-seed{seed}"
        if not (folder / "training.json").is_file():
            log(f"training {folder.name}")
            train(folder, splits, tok, hidden=args.hidden, seed=seed, steps=args.steps)
        folders.append(folder)
    out = DOCS / f"text-bert-h{args.hidden}"
    if args.recipes_only:
        report = json.loads((out / "lmc.json").read_text())
        report["recipes"] = recipes(folders, calib, root)
        (out / "lmc.json").write_text(json.dumps(relative(report), indent=1) + "\n")
        log(f"wrote {out / 'lmc.json'}")
        return
    argv = ["analyze", "--lmc", str(folders[0]), str(folders[1]), "--task", TASK, "--calibration", str(calib),
            "--align", "weight_matching", "activation_matching", "--repair", "--out", str(out)]
    log("alloykit " + " ".join(argv))
    t0, c0 = time.monotonic(), cpu_seconds()
    alloykit(argv)
    report = json.loads((out / "lmc.json").read_text())
    report["training"] = [json.loads((f / "training.json").read_text()) for f in folders]
    report["command"] = "alloykit " + " ".join(argv)
    report["measure_seconds"], report["measure_cpu_seconds"] = round(time.monotonic() - t0, 1), round(cpu_seconds() - c0, 1)
    report["environment"] = environment()
    report["stderr_midpoint"] = {k: math.sqrt(p["accuracy"][len(p["alpha"]) // 2] * (1 - p["accuracy"][len(p["alpha"]) // 2])
                                              / report["examples"]) for k, p in report["paths"].items()}
    report["recipes"] = recipes(folders, calib, root)
    (out / "lmc.json").write_text(json.dumps(relative(report), indent=1) + "\n")
    log(f"wrote {out / 'lmc.json'}")


def relative(data):
    """Paths in the report relative to the repository (it is committed)."""
    root = str(CACHE.parents[1]) + "/"
    if isinstance(data, dict):
        return {k: relative(v) for k, v in data.items()}
    if isinstance(data, list):
        return [relative(v) for v in data]
    return data.replace(root, "") if isinstance(data, str) else data


if __name__ == "__main__":
    main()
