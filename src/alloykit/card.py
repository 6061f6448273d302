"""Everything in an output folder besides the weights: config, tokenizer, recipe, card.

Every output folder (model or adapter) records what made it: the resolved recipe
(``alloykit_recipe.yaml``), ``alloykit_manifest.json`` with versions, seed, inputs,
output files and the fingerprint ``--resume`` compares, and a ``README.md`` model card
whose YAML front matter is what the Hugging Face Hub reads: ``base_model`` (the merged
models, or an adapter's base), ``base_model_relation`` (``merge`` or ``adapter``),
``library_name`` and ``tags``. Cards name models as the recipe does, local folders
relative to the recipe's folder: never an absolute local path. Nothing here contacts a hub.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from alloykit import __version__
from alloykit.output.folder import MANIFEST
from alloykit.plan.layout import set_key
from alloykit.plan.planner import Plan
from alloykit.roles import LAYER_COUNT_KEYS
from alloykit.vocab.output import update_config, write_tokenizer
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _folder(ck) -> Path | None:
    p = getattr(ck, "path", None)
    if p is None or not Path(p).exists():
        return None
    return Path(p) if Path(p).is_dir() else Path(p).parent


def write_metadata(plan: Plan, out: Path, *, copy_tokenizer: bool = True, fingerprint: dict | None = None,
                   names_dir: Path | None = None) -> None:
    """Config, generation config, tokenizer and chat template, then the record of what made the
    folder: ``alloykit_recipe.yaml``, ``alloykit_manifest.json`` (with ``fingerprint``, which
    ``--resume`` compares) and the model card (names relative to ``names_dir``, the recipe's folder)."""
    cfg_ck = plan.checkpoints[plan.config_source] if plan.config_source is not None else None
    config = cfg_ck.config() if cfg_ck is not None else None
    if config is not None:
        if plan.num_layers_out is not None:
            for key in LAYER_COUNT_KEYS:
                if key in config:
                    config[key] = plan.num_layers_out
        for key, value in plan.config_updates.items():  # e.g. a module's layer count after modules: slices
            set_key(config, key, value)
        if plan.vocab is not None:  # rows remapped to the output vocabulary (padded)
            update_config(config, plan.vocab)
        out_dtypes = {j.out_dtype for j in plan.jobs if j.out_dtype.is_floating_point}
        if len(out_dtypes) == 1 and (d := out_dtypes.pop()) in _DTYPE_NAMES:
            key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
            config[key] = _DTYPE_NAMES[d]
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src = _folder(cfg_ck)
        gen = src / "generation_config.json" if src else None
        if gen is not None and gen.is_file():
            shutil.copyfile(gen, out / gen.name)
    tok_ck = plan.checkpoints[plan.tokenizer_source] if plan.tokenizer_source is not None else None
    # a GGUF input carries its tokenizer in its metadata; it builds the files on request
    tok_folder = tok_ck.tokenizer_folder() if hasattr(tok_ck, "tokenizer_folder") else _folder(tok_ck)
    write_tokenizer(out, vocab=plan.vocab, source_folder=tok_folder, copy=copy_tokenizer, chat_template=plan.chat_template)
    recipe = plan.recipe.model_copy(update={"seed": plan.seed})
    manifest = {
        "alloykit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "method": plan.method.name,
        "seed": plan.seed,
        "inputs": [
            {"ref": label, "path": str(getattr(ck, "path", label)), "tensors": len(ck.tensors), "bytes": ck.total_bytes}
            for label, ck in zip(plan.labels, plan.checkpoints)
        ],
        "output": {"tensors": len(plan.jobs), "bytes": plan.out_bytes},
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint
    write_record(out, recipe_yaml=recipe.to_yaml(), manifest=manifest, card=model_card(plan, recipe, names_dir))


def write_record(out: Path, *, recipe_yaml: str, manifest: dict, card: str) -> None:
    """The three files every alloykit output holds: recipe, manifest, model card."""
    (out / "alloykit_recipe.yaml").write_text(recipe_yaml)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(card)


def card_name(ref: str, names_dir: Path | None) -> str:
    """How a model reference appears on a card, never as an absolute local path: a Hub name or
    a relative path as written; an absolute path inside the recipe's folder (``names_dir``)
    relative to it; any other absolute path by its folder name (a Hugging Face cache snapshot,
    ``models--org--name/snapshots/REV``, by its Hub name ``org/name``); ``base+adapter`` part by part."""
    if "+" in ref and not Path(ref).exists():
        return "+".join(card_name(part, names_dir) for part in ref.split("+"))
    p = Path(ref).expanduser()
    if not p.is_absolute():
        return ref
    if names_dir is not None:
        try:
            return p.resolve().relative_to(Path(names_dir).resolve()).as_posix()
        except ValueError:
            pass
    parts = p.parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return p.name or ref


def _relabel(value: Any, names: dict[str, str]) -> Any:
    """``value`` (a recipe as plain data) with every model reference replaced by its card name."""
    if isinstance(value, dict):
        return {k: _relabel(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_relabel(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def front_matter(meta: dict[str, Any]) -> str:
    """The YAML block the Hugging Face Hub reads at the top of README.md."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _parents(refs: list[str], names_dir: Path | None) -> list[str]:
    """The card's ``base_model`` list: each model once, ``base+adapter`` as its two parts."""
    out: list[str] = []
    for ref in refs:
        name = card_name(ref, names_dir)
        for part in (name.split("+") if "+" in name and not Path(ref).exists() else [name]):
            if part not in out:
                out.append(part)
    return out


def model_card(plan: Plan, recipe: Any, names_dir: Path | None = None) -> str:
    spec = plan.method
    base_ref = plan.recipe.base_model
    refs = ([base_ref] if base_ref else []) + [label for label in plan.labels if label != base_ref]
    refs = [r for r in refs if r in plan.labels and getattr(plan.checkpoints[plan.labels.index(r)], "path", None) is not None]
    names = {r: card_name(r, names_dir) for r in plan.labels}
    meta = {"base_model": _parents(refs, names_dir), "base_model_relation": "merge", "library_name": "transformers",
            "tags": ["merge", "alloykit", spec.name]}
    recipe_yaml = yaml.safe_dump(_relabel(recipe.model_dump(exclude_none=True, by_alias=True), names), sort_keys=False)
    lines = [
        front_matter(meta).rstrip("\n"),
        f"# {plan.recipe.name or 'Merged model'}",
        "",
        f"This model was merged with [alloykit](https://pypi.org/project/alloykit/) {__version__} "
        f"using the **{spec.name}** method: {spec.summary}",
        "",
    ]
    if spec.paper:
        lines += [f"Reference: {spec.paper}", ""]
    lines += ["## Inputs", ""]
    lines += [f"- `{names[label]}`" + (" (base)" if label == base_ref else "") for label in plan.labels]
    lines += ["", f"Seed: {plan.seed}. Torch {torch.__version__}.", "", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def adapter_card(base_ref: str, merged_refs: list[str], what: str, summary: str, record_yaml: str,
                 names_dir: Path | None = None) -> str:
    """The card of a PEFT adapter: its base in the front matter, what it holds, how it was made."""
    base = card_name(base_ref, names_dir)
    names = {r: card_name(r, names_dir) for r in [base_ref, *merged_refs]}
    record = _relabel(yaml.safe_load(record_yaml), names)
    meta = {"base_model": base, "base_model_relation": "adapter", "library_name": "peft",
            "tags": ["lora", "alloykit", "merge" if what in ("merge", "merge-lora") else "extracted"]}
    made = {"merge": "the delta of a merged model from its base (`alloykit merge --output-lora`)",
            "merge-lora": "LoRA adapters merged into one (`alloykit merge-lora`)",
            "extract-lora": "a fine-tune's delta from its base, truncated by SVD (`alloykit extract-lora`)"}[what]
    lines = [
        front_matter(meta).rstrip("\n"),
        f"# LoRA adapter of `{base}`",
        "",
        f"A PEFT LoRA adapter written by [alloykit](https://pypi.org/project/alloykit/) {__version__}: {made}.",
        "",
        "## Inputs",
        "",
        *[f"- `{names[r]}`" for r in merged_refs],
        "",
        f"{summary}.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(record, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
