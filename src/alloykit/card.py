"""Everything in an output folder besides the weights: config, tokenizer, recipe, card.

Every output folder records what made it: the resolved recipe
(``alloykit_recipe.yaml``), and ``alloykit_manifest.json`` with versions, seed,
inputs and output files, plus a human-readable ``README.md`` model card. Nothing
here contacts a hub.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch

from alloykit import __version__
from alloykit.plan.planner import Plan
from alloykit.roles import LAYER_COUNT_KEYS

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _folder(ck) -> Path | None:
    p = getattr(ck, "path", None)
    if p is None or not Path(p).exists():
        return None
    return Path(p) if Path(p).is_dir() else Path(p).parent


def write_metadata(plan: Plan, out: Path, *, copy_tokenizer: bool = True) -> None:
    cfg_ck = plan.checkpoints[plan.config_source] if plan.config_source is not None else None
    config = cfg_ck.config() if cfg_ck is not None else None
    if config is not None:
        if plan.num_layers_out is not None:
            for key in LAYER_COUNT_KEYS:
                if key in config:
                    config[key] = plan.num_layers_out
        out_dtypes = {j.out_dtype for j in plan.jobs if j.out_dtype.is_floating_point}
        if len(out_dtypes) == 1 and (d := out_dtypes.pop()) in _DTYPE_NAMES:
            key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
            config[key] = _DTYPE_NAMES[d]
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src = _folder(cfg_ck)
        gen = src / "generation_config.json" if src else None
        if gen is not None and gen.is_file():
            shutil.copyfile(gen, out / gen.name)
    if copy_tokenizer and plan.tokenizer_source is not None:
        tok_ck = plan.checkpoints[plan.tokenizer_source]
        # a GGUF input carries its tokenizer in its metadata; it builds the files on request
        src = tok_ck.tokenizer_folder() if hasattr(tok_ck, "tokenizer_folder") else _folder(tok_ck)
        if src is not None:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
    _chat_template(plan, out)
    recipe = plan.recipe.model_copy(update={"seed": plan.seed})
    (out / "alloykit_recipe.yaml").write_text(recipe.to_yaml())
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
    (out / "alloykit_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(model_card(plan, recipe.to_yaml()))


def _chat_template(plan: Plan, out: Path) -> None:
    tmpl = plan.recipe.chat_template
    if tmpl is None or tmpl == "auto":
        return  # 'auto' keeps the tokenizer source's template, already copied
    (out / "chat_template.jinja").write_text(tmpl)
    cfg = out / "tokenizer_config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        data["chat_template"] = tmpl
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def model_card(plan: Plan, recipe_yaml: str) -> str:
    spec = plan.method
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, alloykit]",
        "---",
        f"# {plan.recipe.name or 'Merged model'}",
        "",
        f"This model was merged with [alloykit](https://pypi.org/project/alloykit/) {__version__} "
        f"using the **{spec.name}** method: {spec.summary}",
        "",
    ]
    if spec.paper:
        lines += [f"Reference: {spec.paper}", ""]
    lines += ["## Inputs", ""]
    lines += [f"- `{label}`" for label in plan.labels]
    lines += ["", f"Seed: {plan.seed}. Torch {torch.__version__}.", "", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
