"""``alloykit search adamerging|greedy-soup|uniform-soup|evolve``: search, then write a recipe for ``alloykit merge``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from alloykit.cli.data_args import DATA_HELP, TASK_HELP, add_max_len, add_model_args
from alloykit.errors import AlloyError
from alloykit.progress import show_logs


def _common(p, *, data: bool, base_required: bool = True) -> None:
    p.add_argument("--base", required=base_required,
                   help="the base model the fine-tunes share" + ("" if base_required else
                                                                " (default: the first model, for its architecture)"))
    p.add_argument("--models", nargs="+", required=True,
                   help="fine-tuned model folders of one layout (sequence-classification or causal LM folders, encoders, "
                        "or quality benchmark fine-tune folders holding encoder/ and heads.safetensors)")
    p.add_argument("--task", "--tasks", nargs="+", dest="tasks", required=not data,
                   help=TASK_HELP + "; only their validation split is read. Heads: each task file's 'head:', else the "
                        "models' heads.safetensors holding the task's key, else the merged model's own head")
    if data:
        p.add_argument("--data", nargs="+", help="unlabelled data files instead of tasks, one per data set: " + DATA_HELP)
    add_max_len(p, causal=128)
    add_model_args(p, head=False)
    p.add_argument("--out", required=True, help="the recipe YAML to write")


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="search merging coefficients or soup ingredients on data; writes a recipe")
    ss = s.add_subparsers(dest="search_command", required=True, metavar="SEARCH")
    from alloykit.cli.lorahub_command import add_lorahub_parser

    add_lorahub_parser(ss)  # alloykit search lorahub

    a = ss.add_parser("adamerging", help="AdaMerging: coefficients learned by entropy minimisation on unlabelled inputs")
    _common(a, data=True)
    a.add_argument("--granularity", choices=["task", "layer"], default="task",
                   help="one coefficient per model (task) or per model and parameter tensor (layer; default task)")
    a.add_argument("--steps", type=int, default=500, help="Adam steps (default 500, the paper's)")
    a.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, the paper's)")
    a.add_argument("--init", type=float, default=0.3, help="initial coefficient (default 0.3, the paper's prior)")
    a.add_argument("--clamp", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="coefficients are clamped to [LO, HI] after every step (default 0 1)")
    a.add_argument("--samples", type=int, default=64, help="unlabelled inputs per task or data file (default 64; 0: all)")
    a.add_argument("--batch-size", type=int, default=16, help="inputs per task per step (default 16)")
    a.add_argument("--seed", type=int, default=0, help="seed of the batch sampling (default 0)")
    a.add_argument("--quiet", "-q", action="store_true")
    a.set_defaults(func=cmd_adamerging)

    g = ss.add_parser("greedy-soup", help="greedy soup: add models to a uniform average while the validation score holds")
    _common(g, data=False, base_required=False)
    g.set_defaults(func=cmd_greedy_soup)

    u = ss.add_parser("uniform-soup", help="uniform soup: the average of every model (a linear recipe)")
    _common(u, data=False, base_required=False)
    u.set_defaults(func=cmd_uniform_soup)
    for action in u._actions:  # scoring is optional for the uniform soup
        if action.dest == "tasks":
            action.required = False

    e = ss.add_parser("evolve", help="CMA-ES over merge recipes, candidates merged in memory and scored on tasks "
                                     "(serially, or on Ray workers); docs/distributed.md")
    e.add_argument("config", help="evolve config YAML: base_model, models, tasks, methods, layer_groups, max_evals, seed...")
    e.add_argument("--out", required=True, help="the best recipe (YAML); beside it OUT.evaluations.csv, OUT.fitness.png "
                                                "and the search state OUT.evolve-state.json")
    e.add_argument("--workers", type=int, default=1, help="evaluations in parallel, on Ray actors (default 1: in this process)")
    e.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="evaluate on a Ray cluster: no ADDRESS starts a local one, 'auto' joins this machine's, else HOST:PORT")
    e.add_argument("--resume", action="store_true", help="continue an interrupted search from its saved state")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_evolve)


def _write(out: str, text: str) -> None:
    path = Path(out)
    if path.parent and not path.parent.exists():
        raise AlloyError(f"--out '{out}': folder '{path.parent}' does not exist")
    path.write_text(text)
    print(f"wrote {out}; merge it with: alloykit merge {out} OUT_FOLDER")


def _model_kw(args) -> dict:
    return {"model_class": args.model_class, "pooling": args.pooling, "max_len": args.max_len}


def cmd_adamerging(args) -> int:
    from alloykit.search.run import adamerging_search

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    text, res = adamerging_search(args.base, args.models, tasks=args.tasks, data=args.data, granularity=args.granularity,
                                  steps=args.steps, lr=args.lr, init=args.init, clamp=tuple(args.clamp),
                                  samples=args.samples or None, batch_size=args.batch_size, seed=args.seed,
                                  log=log, **_model_kw(args))
    print(f"entropy {res.entropy_init:.4f} -> {res.entropy_final:.4f}")
    _write(args.out, text)
    return 0


def cmd_greedy_soup(args) -> int:
    from alloykit.search.run import greedy_soup_search

    text, res = greedy_soup_search(args.base, args.models, args.tasks, **_model_kw(args))
    print(f"greedy soup: {len(res['chosen'])} of {len(args.models)} models, validation score {res['score']:.4f}")
    _write(args.out, text)
    return 0


def cmd_uniform_soup(args) -> int:
    from alloykit.search.run import uniform_soup_recipe

    text, res = uniform_soup_recipe(args.base, args.models, args.tasks, **_model_kw(args))
    if res["score"] is not None:
        print(f"uniform soup of {len(args.models)} models: validation score {res['score']:.4f}")
    _write(args.out, text)
    return 0


def cmd_evolve(args) -> int:
    from alloykit.distributed.evolve import evolve

    if args.workers < 1:
        raise AlloyError(f"--workers {args.workers}: give 1 or more")
    if args.quiet:
        show_logs(logging.WARNING)  # quiet: warnings and errors only (no 'ray cluster:' line, no progress)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    res = evolve(args.config, args.out, workers=args.workers, ray_address=args.ray, resume=args.resume,
                 progress=not args.quiet, log=log)
    if args.quiet:
        return 0
    best = res.best
    print(f"evolve: best of {len(res.evaluations)} evaluations: {best['method']}, fitness {best['score']:.4f} "
          f"(evaluation {best['eval']})")
    print(f"wrote {res.paths['recipe']} ({res.paths['csv'].name}, {res.paths['plot'].name}); merge it with: "
          f"alloykit merge {res.paths['recipe']} OUT_FOLDER")
    return 0
