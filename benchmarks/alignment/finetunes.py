"""What alignment does for fine-tunes of one shared base: the real all-MiniLM-L6-v2 fine-tuned
here (the quality benchmark's recipe: 250 steps, AdamW 5e-5, mean pooling, a linear head)
on WordNet noun supersenses from two seeds, and on fortune categories.

For each pair: the permutation weight matching and activation matching find (residual
stream included, i.e. ``permute_outputs``), and for the same-task pair the linear path
(encoder and head interpolated) on the task's test split, as is and aligned.

    nice -n 15 python benchmarks/alignment/finetunes.py

Fine-tunes are cached under .bench/alignment/finetunes (git-ignored); writes
docs/alignment/finetunes.json and docs/alignment/lmc-minilm-finetunes.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, DOCS, cpu_seconds, environment, log, write_json  # noqa: E402

from alloykit.align import align, lmc  # noqa: E402
from alloykit.align.spec import HeadPerm  # noqa: E402
from alloykit.eval.model import FinetuneRecipe, base_model_path, encode, finetune, forward, load_encoder, load_tokenizer  # noqa: E402
from alloykit.eval.tasks import get_task  # noqa: E402

ROOT = CACHE / "finetunes"
RUNS = (("wordnet_noun", 0), ("wordnet_noun", 1), ("fortune_category", 0))


class Classifier(nn.Module):
    """Encoder, mean pooling, the task's head: the benchmark's model as one module (so the path interpolates both)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask):
        return self.head(forward(self.encoder, input_ids, attention_mask))


def cached_finetune(task: str, seed: int, tok) -> tuple[nn.Module, nn.Linear]:
    folder = ROOT / f"{task}-seed{seed}"
    encoder = load_encoder(base_model_path())
    splits = get_task(task).splits(seed=0)
    n_classes = max(splits.train.labels) + 1
    if (folder / "heads.safetensors").is_file():
        encoder.load_state_dict(load_file(folder / "encoder.safetensors"))
        hw = load_file(folder / "heads.safetensors")
        head = nn.Linear(hw["weight"].shape[1], hw["weight"].shape[0])
        head.load_state_dict(hw)
        return encoder.eval(), head.eval()
    log(f"fine-tuning MiniLM on {task}, seed {seed}")
    recipe = FinetuneRecipe(seed=seed)
    heads = finetune(encoder, {task: encode(tok, splits.train, recipe.max_len)}, {task: n_classes}, recipe, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / "encoder.safetensors")
    save_file({k: v.detach().contiguous() for k, v in heads[task].state_dict().items()}, folder / "heads.safetensors")
    return encoder.eval(), heads[task].eval()


def moved_by_kind(res) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for g in res.spec.groups:
        kind = "residual" if g.name == "residual" else g.name.split(".")[-1]
        out.setdefault(kind, []).append(res.moved()[g.name])
    return {k: sum(v) / len(v) for k, v in out.items()}


def main() -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer(base_model_path())
    models = {(t, s): cached_finetune(t, s, tok) for t, s in RUNS}
    calib_split = get_task("wordnet_noun").splits(seed=0)
    calib_enc = encode(tok, calib_split.train, 32).head(256)
    calib = [{"input_ids": calib_enc.batch(torch.arange(i, min(i + 32, 256)))[0],
              "attention_mask": calib_enc.batch(torch.arange(i, min(i + 32, 256)))[1]} for i in range(0, 256, 32)]
    results: dict = {"pairs": {}, "environment": environment()}
    pairs = (((("wordnet_noun", 0), ("wordnet_noun", 1)), "same task, seeds 0 and 1"),
             ((("wordnet_noun", 0), ("fortune_category", 0)), "different tasks"))
    for (ka, kb), what in pairs:
        (enc_a, head_a), (enc_b, head_b) = models[ka], models[kb]
        row: dict = {"what": what, "a": f"{ka[0]} seed {ka[1]}", "b": f"{kb[0]} seed {kb[1]}"}
        for method in ("weight_matching", "activation_matching"):
            t0, c0 = time.monotonic(), cpu_seconds()
            res = align(enc_b, enc_a, method=method, data=calib, permute_outputs=True)
            row[method] = {"moved_fraction": moved_by_kind(res), "seconds": round(time.monotonic() - t0, 1),
                           "cpu_seconds": round(cpu_seconds() - c0, 1),
                           **{k: v for k, v in res.report.items() if k in ("iterations", "objective_before", "objective_after")}}
            if "mean_correlation" in res.report:
                mc = res.report["mean_correlation"].values()
                row[method]["mean_correlation"] = {"as_is": sum(m["identity"] for m in mc) / len(mc),
                                                   "matched": sum(m["matched"] for m in mc) / len(mc)}
            log(f"{what}: {method}: moved {row[method]['moved_fraction']}")
            if ka[0] == kb[0] and method == "weight_matching":
                test = get_task(ka[0]).splits(seed=0).test
                enc = encode(tok, test, 32)
                idx = torch.arange(len(enc))
                batches = [(dict(zip(("input_ids", "attention_mask"), enc.batch(idx[i:i + 100]))), enc.labels[i:i + 100])
                           for i in range(0, len(enc), 100)]
                evaluate = lmc.classifier_evaluator(batches)
                perm = res.perms["residual"]
                head_aligned = nn.Linear(head_b.in_features, head_b.out_features)
                head_aligned.load_state_dict({"weight": head_b.weight.detach().index_select(1, perm), "bias": head_b.bias.detach()})
                a, b = Classifier(enc_a, head_a), Classifier(enc_b, head_b)
                b_aligned = Classifier(res.module, head_aligned)
                paths = {"naive": lmc.path(a, b, evaluate, progress=log),
                         "weight_matching": lmc.path(a, b_aligned, evaluate, progress=log)}
                row["paths"] = paths
                row["test_examples"] = len(enc)
                from alloykit.align.plots import plot_paths

                plot_paths(paths, DOCS / "lmc-minilm-finetunes.png",
                           f"MiniLM fine-tunes on {ka[0]} (seeds {ka[1]}, {kb[1]}): test loss / accuracy")
            identity = all(p.is_identity() if isinstance(p, HeadPerm) else bool((p == torch.arange(len(p))).all())
                           for p in res.perms.values())
            row[method]["identity"] = identity
        results["pairs"][what] = row
    write_json(DOCS / "finetunes.json", results)


if __name__ == "__main__":
    main()
