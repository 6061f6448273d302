"""lm-evaluation-harness tasks on a model folder, offline: ``alloykit eval MODEL --lm-eval TASKS``.

The model is a Hugging Face folder (a merge's output), a GGUF file or a folder holding one
(loaded through transformers' GGUF reader), loaded here with ``trust_remote_code=False`` and
handed to the harness's ``HFLM``. Tasks are the harness's own or local YAML task configs
(``--include-path DIR``); :func:`write_choice_task` writes one over a local JSONL file
(``dataset_path: json`` + ``data_files``), so nothing is downloaded: ``HF_DATASETS_OFFLINE``
and ``HF_HUB_OFFLINE`` are set unless the caller set them.

A multiple-choice task scores each choice by the summed log-probability of its tokens given
the prompt (the prompt's tokens, then the rest of prompt + choice); ``acc`` is the share of
examples whose true choice scores highest, ``acc_norm`` the same with scores divided by the
choices' lengths in bytes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from alloykit.errors import AlloyError, CheckpointError, did_you_mean

log = logging.getLogger(__name__)

INSTALL = "pip install 'alloykit[lm-eval]'"
DTYPES = ("float32", "bfloat16", "float16")


def _offline() -> None:
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def _require():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AlloyError(f"--lm-eval needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def model_files(model: str | Path) -> tuple[Path, dict]:
    """(folder, extra from_pretrained arguments) of a model folder, a .gguf file, or a folder
    holding one; checked before anything slow runs."""
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model '{model}': no file or folder there (alloykit eval reads local models)")
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not any(path.glob("*.safetensors")) else []
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if len(ggufs) == 1:
        return path, {"gguf_file": ggufs[0].name}
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model '{model}': no config.json; give a model folder (a merge's output) or a .gguf file")
    return path, {}


def load_model(model: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of a model folder or GGUF, without running any code shipped with it."""
    import torch
    import transformers

    folder, kw = model_files(model)
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                               trust_remote_code=False, local_files_only=True, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"model '{model}': transformers cannot load it as a causal LM: {str(err).splitlines()[0]}") from None
    return lm.to(device).eval(), tok


def task_manager(tasks: list[str], include_path: list[str] | None, *, what: str = "--lm-eval task",
                 include_what: str = "--include-path"):
    """The harness's task index: the local folders alone when they hold every task asked
    for (indexing the harness's thousands of built-in configs takes a while), else both.
    ``what``/``include_what``: how the error line names the task and the folders option."""
    _, _, TaskManager = _require()
    paths = [str(Path(p)) for p in include_path or []]
    for p in paths:
        if not Path(p).is_dir():
            raise AlloyError(f"{include_what} {p}: no such folder")
    local = None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=paths or None)
    for t in tasks:
        if t not in tm.all_tasks:
            here = f"; the tasks in {include_what}: {', '.join(sorted(local.all_tasks)) or 'none'}" if local else ""
            raise AlloyError(f"{what} '{t}' is not a harness task or a task in {include_what}"
                             f"{did_you_mean(t, tm.all_tasks)}{here}")
    return tm


def run_lm_eval(model: str | Path, tasks: list[str], *, include_path: list[str] | None = None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str = "cpu", dtype: str = "float32",
                seed: int = 0) -> dict[str, Any]:
    """Run harness ``tasks`` on ``model``; returns {"results": {task: {metric: value}}, "n": {task: samples}, ...}."""
    _offline()
    _require()
    if not tasks:
        raise AlloyError("--lm-eval: name at least one task")
    if dtype not in DTYPES:
        raise AlloyError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    model_files(model)
    tm = task_manager(tasks, include_path)
    model_obj, tok = load_model(model, dtype, device)
    res = evaluate_lm(model_obj, tok, tasks, tm, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                      device=device, seed=seed)
    return {"model": str(model), **res, "dtype": dtype}


def evaluate_lm(model_obj, tok, tasks: list[str], tm, *, limit: int | float | None = None, batch_size: int = 8,
                num_fewshot: int | None = None, device: str = "cpu", seed: int = 0,
                bootstrap_iters: int = 1000) -> dict[str, Any]:
    """Harness ``tasks`` (indexed by ``tm``, from :func:`task_manager`) on a transformers causal LM
    instance and its tokenizer (``alloykit eval --lm-eval`` and ``search evolve``'s lm-eval fitness
    both score through here); returns {"results": {task: {metric: value}}, "higher_is_better":
    {task: {metric: bool}}, "n": ..., ...}."""
    _offline()
    lm_eval, HFLM, _ = _require()
    lm = HFLM(pretrained=model_obj, tokenizer=tok, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters)
    # the harness keys metrics 'NAME,FILTER' ('acc,none', 'acc_stderr,none'); other keys are bookkeeping
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
               for task, metrics in (out or {}).get("results", {}).items()}
    return {"tasks": list(tasks), "results": results, "higher_is_better": (out or {}).get("higher_is_better", {}),
            "n": (out or {}).get("n-samples", {}), "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "limit": limit, "num_fewshot": num_fewshot}


def write_choice_task(folder: str | Path, name: str, rows: list[dict], *, group: str | None = None) -> Path:
    """Write a local multiple-choice harness task: ``NAME.jsonl`` (rows with ``prompt``,
    ``choices`` and ``label``, the index of the right choice) and ``NAME.yaml`` pointing at it.
    Choices are appended to the prompt as they are (give them a leading space)."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i, r in enumerate(rows):
            if not (isinstance(r.get("choices"), list) and 0 <= int(r.get("label", -1)) < len(r["choices"])):
                raise AlloyError(f"task '{name}' row {i}: needs 'prompt', a 'choices' list and 'label' (an index into it)")
            fh.write(json.dumps({"prompt": r["prompt"], "choices": r["choices"], "label": int(r["label"])}, ensure_ascii=False) + "\n")
    lines = [
        f"task: {name}",
        *([f"tag: {group}"] if group else []),
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{prompt}}"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def format_results(res: dict[str, Any]) -> str:
    lines = []
    for task, metrics in res["results"].items():
        shown = [f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}" if isinstance(metrics.get(k + "_stderr"), float) else "")
                 for k, v in metrics.items() if not k.endswith("_stderr")]
        n = res["n"].get(task, {})
        count = f" ({n.get('effective', n.get('original'))} examples)" if isinstance(n, dict) and n else ""
        lines.append(f"{task}: " + ", ".join(shown) + count)
    return "\n".join(lines)
