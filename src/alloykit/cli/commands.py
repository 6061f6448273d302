"""The CLI's subcommands. Each is a few lines over the Python API."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from argparse import Namespace
from collections import Counter
from pathlib import Path

from alloykit.errors import RecipeError
from alloykit.progress import show_logs


def _request(args: Namespace):
    from alloykit.request import MergeRequest

    return MergeRequest.of(args.recipe, seed=getattr(args, "seed", None), allow_pickle=args.allow_pickle)


def _plan(args: Namespace):
    return _request(args).plan()


def cmd_merge(args: Namespace) -> int:
    import time

    from alloykit.config import load_documents
    from alloykit.merge import WriteOptions, run_merge
    from alloykit.output.adapter import summary
    from alloykit.request import MergeRequest

    _merge_flags(args)
    documents = load_documents(args.recipe)
    if len(documents) > 1:  # a multi-stage recipe (mergekit-multi's format)
        from alloykit.cli.multi_command import merge_documents

        return merge_documents(args, documents)
    request = MergeRequest.of(documents[0], recipe_dir=Path(args.recipe).parent, seed=args.seed,
                              allow_pickle=args.allow_pickle).with_out_dtype(args.dtype)
    device = "cuda" if args.cuda else args.device
    check_device(device)
    options = WriteOptions(device=device, threads=args.threads, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                           resume=args.resume, progress=not args.quiet, fail_on_nonfinite=args.fail_on_nonfinite,
                           budget_bytes=args.memory_budget, copy_tokenizer=args.copy_tokenizer,
                           gguf_type=args.gguf_type if args.output_format == "gguf" else None)
    t0 = time.monotonic()
    with interrupt_on_sigterm():
        if getattr(args, "ray", None) is not None:
            written = _merge_on_ray(args, request, options)
        else:
            written = run_merge(request, args.out, options, output_lora=args.output_lora,
                                lora_save_others=not args.lora_skip_others)
    if written.already_done:
        print(f"nothing to do: '{written.path}' already holds this merge (same recipe, inputs and options)")
    elif written.reports is not None:
        print(summary(written.reports) + f" -> {args.out}")
    elif not args.quiet:
        print(f"merged with {request.recipe.merge_method} in {time.monotonic() - t0:.1f}s -> {written.path}")
    return 0


def _merge_on_ray(args: Namespace, request, options):
    from alloykit.distributed.cluster import import_ray

    import_ray(args.ray)  # one line naming the pip command when ray is absent, before anything else
    from alloykit.distributed.merge import RayOptions, merge_on_ray

    if args.output_lora is not None:
        raise RecipeError("--ray with --output-lora: adapters are written on one machine; drop one of the two flags")
    return merge_on_ray(request, args.out, options, RayOptions(args.ray, args.ray_cpus))


def _merge_flags(args: Namespace) -> None:
    """mergekit-yaml's flags: --trust-remote-code refused, -v logging, the two shard-size spellings."""
    if args.trust_remote_code:
        raise RecipeError("--trust-remote-code: alloykit never runs code that comes with a checkpoint; "
                          "remove the flag (models whose architecture needs remote code cannot be merged here)")
    # the library's messages: what the merge decides (-v; -vv: every detail), none but warnings with -q
    show_logs(logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose or not args.quiet else logging.WARNING)
    if args.out_shard_size is not None and args.max_shard_size is not None:
        raise RecipeError("give one of --max-shard-size (bytes, e.g. 5GB) or --out-shard-size (mergekit's, e.g. 5B)")
    if args.max_shard_size is None:
        from alloykit.merge import DEFAULT_SHARD_SIZE

        args.max_shard_size = args.out_shard_size or DEFAULT_SHARD_SIZE


@contextlib.contextmanager
def interrupt_on_sigterm():
    """SIGTERM (a scheduler stopping the job, ``kill``) ends the run as Ctrl-C does: the
    output's working folder is kept for --resume and the user is told where it is."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_device(device: str) -> None:
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
        if not getattr(args, "all", False):
            from alloykit.cli.plan_summary import summary_lines

            print("\n".join(summary_lines(plan)))
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
    from alloykit.cli.plan_summary import job_params

    parts = [f"{k}={v}" for k, v in job_params(job).items()]
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
    from alloykit.config import load_documents

    documents = load_documents(args.recipe)
    if len(documents) > 1:  # a multi-stage recipe
        from alloykit.cli.multi_command import validate_documents

        return validate_documents(args, documents)
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


def cmd_inspect(args: Namespace) -> int:
    from alloykit.io import hub
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.io.gguf import open_gguf

    # a .gguf file (or a folder with one) is read by the GGUF reader; anything else may be a Hub name
    ck = open_gguf(Path(args.model), args.model) or Checkpoint(hub.locate(args.model, allow_pickle=args.allow_pickle),
                                                                allow_pickle=args.allow_pickle)
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
