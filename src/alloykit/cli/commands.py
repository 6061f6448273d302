"""The CLI's subcommands. Each is a few lines over the Python API."""

from __future__ import annotations

import json
from argparse import Namespace
from collections import Counter
from pathlib import Path

from alloykit.errors import RecipeError


def _plan(args: Namespace):
    from alloykit.merge import plan_recipe

    return plan_recipe(args.recipe, allow_pickle=args.allow_pickle, seed=getattr(args, "seed", None))


def cmd_merge(args: Namespace) -> int:
    from alloykit.config import load_recipe
    from alloykit.merge import merge

    recipe = load_recipe(args.recipe)
    if args.dtype:
        recipe = recipe.model_copy(update={"out_dtype": args.dtype})
    device = "cuda" if args.cuda else args.device
    _check_device(device)
    import time

    t0 = time.monotonic()
    if args.output_lora is not None:
        from alloykit.lora.output import merge_to_lora
        from alloykit.lora.extract import summary

        reports = merge_to_lora(recipe, args.out, args.output_lora, recipe_dir=Path(args.recipe).parent, device=device,
                                threads=args.threads, seed=args.seed, allow_pickle=args.allow_pickle,
                                save_others=not args.lora_skip_others, progress=not args.quiet)
        print(summary(reports) + f" -> {args.out}")
        return 0
    out = merge(
        recipe, args.out, recipe_dir=Path(args.recipe).parent, device=device, threads=args.threads, seed=args.seed,
        max_shard_size=args.max_shard_size, allow_pickle=args.allow_pickle, overwrite=args.overwrite, resume=args.resume,
        progress=not args.quiet, fail_on_nonfinite=args.fail_on_nonfinite, budget_bytes=args.memory_budget,
        copy_tokenizer=args.copy_tokenizer, gguf_type=args.gguf_type if args.output_format == "gguf" else None,
    )
    if not args.quiet:
        print(f"merged with {recipe.merge_method} in {time.monotonic() - t0:.1f}s -> {out}")
    return 0


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise RecipeError(f"--device {device}: use cpu or cuda")


def cmd_plan(args: Namespace) -> int:
    plan = _plan(args)
    try:
        if args.json:
            print(json.dumps(_plan_json(plan), indent=1))
            return 0
        print(f"method: {plan.method.name}   seed: {plan.seed}   jobs: {len(plan.jobs)}   "
              f"read: {plan.in_bytes / 1e9:.3f} GB   write: {plan.out_bytes / 1e9:.3f} GB")
        for i, label in enumerate(plan.labels):
            print(f"  [{i}] {label}")
        for j in plan.jobs:
            src = ", ".join(f"[{s.model}]" + ("" if s.tensor == j.name else f":{s.tensor}") for s in j.sources)
            base = f" base=[{j.base.model}]" if j.base else ""
            what = "copy" if j.copy else plan.method.name
            params = "" if j.copy else _params_str(j)
            stats = f" stats=({', '.join(f'[{s.model}]' for s in j.stats)})" if j.stats else ""
            print(f"{j.name} {list(j.shape)} {str(j.out_dtype).removeprefix('torch.')} <- {what}({src}){base}{stats}{params}")
    finally:
        plan.close()
    return 0


def _params_str(job) -> str:
    shared = job.params.model_dump(by_alias=True) if job.params is not None else {}
    per = [m.model_dump(by_alias=True) for m in job.model_params]
    parts = [f"{k}={v}" for k, v in shared.items()]
    keys = per[0].keys() if per else []
    parts += [f"{k}={[p[k] for p in per]}" for k in keys]
    return (" " + " ".join(parts)) if parts else ""


def _plan_json(plan) -> dict:
    return {
        "method": plan.method.name,
        "seed": plan.seed,
        "inputs": plan.labels,
        "read_bytes": plan.in_bytes,
        "write_bytes": plan.out_bytes,
        "jobs": [
            {
                "name": j.name,
                "shape": list(j.shape),
                "dtype": str(j.out_dtype).removeprefix("torch."),
                "copy": j.copy,
                "sources": [{"model": s.model, "tensor": s.tensor} for s in j.sources],
                "base": {"model": j.base.model, "tensor": j.base.tensor} if j.base else None,
                "params": j.params.model_dump(by_alias=True) if j.params is not None else None,
                "model_params": [m.model_dump(by_alias=True) for m in j.model_params],
                **({"stats": [{"model": s.model, "tensor": s.tensor} for s in j.stats]} if j.stats else {}),
            }
            for j in plan.jobs
        ],
    }


def cmd_validate(args: Namespace) -> int:
    plan = _plan(args)
    try:
        inputs = len({s.model for j in plan.jobs if not j.copy for s in j.sources})
        base = " onto a base" if any(j.base for j in plan.jobs) else ""
        print(f"OK: {plan.method.name} merge of {inputs} model(s){base}, {len(plan.jobs)} tensors, "
              f"{plan.out_bytes / 1e9:.3f} GB to write")
    finally:
        plan.close()
    return 0


def cmd_methods(args: Namespace) -> int:
    from alloykit.methods.registry import all_methods, get_method

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    if args.name is None:
        methods = all_methods()
        width = max(len(n) for n in methods)
        for name, spec in methods.items():
            print(f"{name:<{width}}  {spec.summary}")
        print(f"\n{len(methods)} methods. 'alloykit methods NAME' shows one method's parameters.")
        return 0
    print(describe_method(get_method(args.name)))
    return 0


def describe_method(spec) -> str:
    """Text shown by 'alloykit methods NAME', generated from the method's declaration."""
    lines = [f"{spec.name}: {spec.summary}", ""]
    body = spec.doc.split("\n", 1)[1].strip() if "\n" in spec.doc else ""
    if body:
        lines += [body, ""]
    base = {"required": "required", "optional": "optional (used when given)", "ignored": "not used"}[spec.base]
    count = f"{spec.min_models}+" if spec.max_models is None else (
        str(spec.min_models) if spec.min_models == spec.max_models else f"{spec.min_models}-{spec.max_models}")
    lines.append(f"base_model: {base}; models besides the base: {count}; randomized: {'yes (--seed)' if spec.randomized else 'no'}")
    if spec.needs_stats:
        how = ("alloykit stats collect-merged MODEL... --out STATS..." if spec.stats_inputs == "merged"
               else f"alloykit stats collect MODEL --kind {spec.needs_stats} --out STATS")
        lines.append(f"statistics: {spec.needs_stats}, named by 'stats: STATS' on each model (written by '{how}')")
    if spec.reproduces:
        lines.append(f"reproduces: {spec.reproduces}")
    if spec.paper:
        lines.append(f"paper: {spec.paper}")
    lines += ["", "parameters:"]
    fields = spec.param_fields()
    if not fields:
        lines.append("  (none)")
    for key, (scope, info) in fields.items():
        lines.append(f"  {key} ({scope}, {_type_name(info.annotation)}, {_default(info)}{_bounds(info)}): {info.description or ''}")
    return "\n".join(lines)


def methods_markdown() -> str:
    """docs/methods.md: every method's reference, generated from its declaration."""
    from alloykit.methods.registry import all_methods

    out = ["# Merge methods", "", "Generated by `alloykit methods --markdown` from the methods' own declarations.", ""]
    out += ["| method | summary |", "|---|---|"]
    out += [f"| [{n}](#{n}) | {s.summary} |" for n, s in all_methods().items()]
    for name, spec in all_methods().items():
        out += ["", f"## {name}", "", "```", describe_method(spec), "```"]
    return "\n".join(out) + "\n"


def _type_name(ann) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _default(info) -> str:
    return "required" if info.is_required() else f"default {info.default!r}"


def _bounds(info) -> str:
    out = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return (", " + " ".join(out)) if out else ""


def cmd_extract_lora(args: Namespace) -> int:
    from alloykit.lora.extract import extract_lora, summary

    _check_device(args.device)
    reports = extract_lora(args.finetuned, args.base, args.out, args.rank, save_others=not args.skip_others,
                           device=args.device, allow_pickle=args.allow_pickle)
    if args.per_layer:
        for r in reports:
            print(f"{r.name} {list(r.shape)} {r.kind} {r.rel_error:.5f}")
    print(summary(reports) + f" -> {args.out}")
    return 0


def cmd_merge_lora(args: Namespace) -> int:
    from alloykit.lora.merge import merge_adapters

    if args.recipe:
        from alloykit.lora.hub import load_merge_lora_recipe

        if len(args.adapters) != 1:
            raise RecipeError("merge-lora --recipe FILE: give only the output folder")
        r = load_merge_lora_recipe(args.recipe)
        adapters, out, base = r["adapters"], args.adapters[0], r["base"]
        method, weights, rank, density = r.get("method", "cat"), r.get("weights"), r.get("rank"), r.get("density")
        seed, knots = r.get("seed", 0), r.get("knots_merge", "ties")
    else:
        if len(args.adapters) < 2:
            raise RecipeError("merge-lora: give the adapter folders and then the output folder")
        if not args.base:
            raise RecipeError("merge-lora: give --base, the adapters' base model folder")
        *adapters, out = args.adapters
        base, method, weights, rank, density = args.base, args.method, args.weights, args.rank, args.density
        seed, knots = args.seed, args.knots_merge
    errors = merge_adapters(adapters, base, out, method=method, weights=weights, rank=rank,
                            model_params={"density": density} if density is not None else None, seed=seed, knots_merge=knots)
    worst = max(errors.values(), default=0.0)
    print(f"merged {len(adapters)} adapters with {method} -> {out}"
          + (f" (truncation error per module: worst {worst:.4f})" if errors else " (exact)"))
    return 0


def cmd_inspect(args: Namespace) -> int:
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.io.gguf import open_gguf

    ck = open_gguf(Path(args.model), args.model) or Checkpoint(args.model, allow_pickle=args.allow_pickle)
    try:
        infos = list(ck.tensors.values())
        params = sum(t.numel for t in infos)
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in infos)
        files = Counter(Path(t.path).name for t in infos)
        print(f"model: {args.model}")
        cfg = ck.config()
        if cfg:
            print(f"architecture: {', '.join(cfg.get('architectures') or [cfg.get('model_type', '?')])}")
        print(f"tensors: {len(infos)}   parameters: {params:,} ({params / 1e9:.3f}B)   bytes: {ck.total_bytes:,}")
        print("dtypes: " + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common()))
        if hasattr(ck, "stored_types"):  # a GGUF file: what it stores, dequantized on read
            print("stored in GGUF as: " + ", ".join(f"{t} x{n}" for t, n in ck.stored_types.items()))
        print(f"shards: {len(files)}")
        for f, n in sorted(files.items()):
            print(f"  {f}: {n} tensors")
        if args.tensors:
            for t in infos:
                print(f"{t.name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    finally:
        ck.close()
    return 0
