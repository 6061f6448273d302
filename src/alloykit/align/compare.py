"""``alloykit analyze --lmc A B --data FILE``: the linear path between two model folders,
as they are and after aligning B to A (and with REPAIR), with barriers and a plot.

* causal LMs (``*ForCausalLM``): ``--data`` is text (.txt / .jsonl "text"); loss is the mean
  next-token negative log-likelihood, accuracy the next-token top-1 accuracy;
* sequence classifiers (``*ForSequenceClassification``): ``--data`` is .jsonl with "text"
  and an integer "label"; loss is cross-entropy, accuracy top-1.

Calibration (activation matching, REPAIR) reads ``--calibration`` (default: ``--data``'s texts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from alloykit.align import lmc
from alloykit.align.api import align, load_hf_module, read_config
from alloykit.align.data import labelled_texts, text_batches, token_limit
from alloykit.align.families import hf_spec
from alloykit.align.repair import endpoint_targets, producers, repair
from alloykit.errors import AlloyError, CheckpointError


def _kind(config: dict, label: str) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    raise CheckpointError(f"model '{label}': --lmc evaluates causal LMs (*ForCausalLM) on text and sequence "
                          f"classifiers (*ForSequenceClassification) on labelled .jsonl; config.json names {archs or 'no architecture'}")


def _classifier_batches(folder: Path, data: Path, samples: int, max_len: int, batch_size: int) -> tuple[list, int]:
    from alloykit.eval.model import load_tokenizer

    texts, labels = labelled_texts(data, samples)
    if not texts:
        raise AlloyError(f"--data '{data}': no labelled examples")
    try:
        tok = load_tokenizer(folder)
    except (OSError, ValueError):
        raise AlloyError(f"model '{folder}': no tokenizer files to read --data with; add the tokenizer to the folder") from None
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                    torch.tensor(labels[i:i + batch_size])))
    return out, len(texts)


def lmc_report(a: str | Path, b: str | Path, data: str | Path, *, methods: tuple[str, ...] = ("weight_matching",),
               with_repair: bool = False, calibration: str | Path | None = None, steps: int = 11, samples: int = 1000,
               calibration_samples: int = 256, max_len: int = 128, batch_size: int = 32, seed: int = 0,
               say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Loss/accuracy along the naive path and along each aligned path (plus REPAIR when asked)."""
    a, b, data = Path(a), Path(b), Path(data)
    cfg_a, cfg_b = read_config(a, str(a)), read_config(b, str(b))
    if cfg_a.get("model_type") != cfg_b.get("model_type"):
        raise CheckpointError(f"models '{a}' and '{b}' are of different types ({cfg_a.get('model_type')}, "
                              f"{cfg_b.get('model_type')}); the linear path needs one architecture")
    kind = _kind(cfg_a, str(a))
    max_len = token_limit(cfg_a, max_len)
    t0 = time.monotonic()
    model_a, model_b = load_hf_module(a, cfg_a), load_hf_module(b, cfg_b)
    vocab = cfg_a.get("vocab_size", 256)
    if kind == "causal_lm":
        eval_batches, source = text_batches(a, data, samples=samples, max_len=max_len, vocab=vocab, batch_size=batch_size)
        evaluate, n = lmc.causal_lm_evaluator(eval_batches), sum(int(x["attention_mask"].sum()) for x in eval_batches)
    else:
        eval_batches, n = _classifier_batches(a, data, samples, max_len, batch_size)
        evaluate, source = lmc.classifier_evaluator(eval_batches), f"{data} (first {n} labelled texts)"
    calib_file = Path(calibration) if calibration else data
    calib, calib_source = text_batches(a, calib_file, samples=calibration_samples, max_len=max_len, vocab=vocab,
                                       batch_size=16)
    report: dict[str, Any] = {"models": [str(a), str(b)], "kind": kind, "data": source, "examples": n,
                              "calibration": calib_source, "paths": {}, "moved_fraction": {}}
    say(f"lmc: {kind}, {n} evaluation {'tokens' if kind == 'causal_lm' else 'examples'}, {steps} points per path")
    repair_spec = None
    if with_repair:
        sd = model_a.state_dict()
        repair_spec = hf_spec(cfg_a, {k: tuple(v.shape) for k, v in sd.items()}, permute_outputs=True,
                              float_names={k for k, v in sd.items() if v.is_floating_point()})
        producers(repair_spec, model_a)  # refuses families REPAIR cannot rescale, before any evaluation
    report["paths"]["naive"] = lmc.path(model_a, model_b, evaluate, steps=steps, progress=say)
    for method in methods:
        res = align(model_b, model_a, method=method, data=calib, seed=seed)
        report["moved_fraction"][method] = res.report["moved_fraction_mean"]
        report["paths"][method] = lmc.path(model_a, res.module, evaluate, steps=steps, progress=say)
        if with_repair:
            report["paths"][f"{method}+repair"] = lmc.path(
                model_a, res.module, evaluate, steps=steps, progress=say,
                adjust=_repairer(repair_spec, model_a, res.module, calib))
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def _repairer(spec, model_a, model_b, calib) -> Callable:
    names = producers(spec, model_a)
    ta = endpoint_targets([model_a], [1.0], names, calib)
    tb = endpoint_targets([model_b], [1.0], names, calib)

    def adjust(module, alpha: float) -> None:
        mixed = {n: ((1 - alpha) * ta[n][0] + alpha * tb[n][0], (1 - alpha) * ta[n][1] + alpha * tb[n][1]) for n in names}
        repair(module, [], spec, calib, targets=mixed)

    return adjust


def summary(report: dict) -> str:
    lines = [f"linear path {report['models'][0]} -> {report['models'][1]} ({report['kind']}, {report['data']}):"]
    for name, p in report["paths"].items():
        mid = len(p["alpha"]) // 2
        moved = report["moved_fraction"].get(name)
        extra = f"; {100 * moved:.0f}% of units moved" if moved is not None else ""
        lines.append(f"  {name:<24} accuracy barrier {100 * p['accuracy_barrier']:5.2f} pts, loss barrier "
                     f"{p['loss_barrier']:.4f}; midpoint accuracy {100 * p['accuracy'][mid]:.2f}% "
                     f"(endpoints {100 * p['accuracy'][0]:.2f}%, {100 * p['accuracy'][-1]:.2f}%){extra}")
    return "\n".join(lines)
