"""``alloykit search lorahub``: learn LoRA adapter weights from a few examples (LoraHub).

``add_lorahub_parser`` adds the subcommand to the ``search`` subparsers (cli/search_command.py).
"""

from __future__ import annotations

from argparse import Namespace


def add_lorahub_parser(subparsers) -> None:
    p = subparsers.add_parser("lorahub", help="learn weights of LoRA adapters from a few examples (LoraHub), write a merge-lora recipe")
    p.add_argument("--base", required=True, help="the adapters' base model folder (a causal LM)")
    p.add_argument("--adapters", nargs="+", required=True, help="PEFT adapter folders of that base, of one rank")
    p.add_argument("--data", required=True,
                   help="JSON lines: {\"input\": ..., \"output\": ...} or {\"input_ids\": [...], \"output_ids\": [...]}")
    p.add_argument("--steps", type=int, default=40, help="objective evaluations (the paper's budget: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer folder for text examples (default: the base folder)")
    p.add_argument("--out", required=True, help="the recipe to write (YAML); run it with 'alloykit merge-lora --recipe'")
    p.set_defaults(func=cmd_lorahub)


def cmd_lorahub(args: Namespace) -> int:
    from alloykit.lora.hub import load_examples, lorahub_search, write_recipe

    examples = load_examples(args.data, args.tokenizer or args.base)
    result = lorahub_search(args.base, args.adapters, examples, steps=args.steps, seed=args.seed)
    write_recipe(args.out, args.base, args.adapters, result, args.steps, args.seed)
    weights = ", ".join(f"{w:.4f}" for w in result.weights)
    print(f"lorahub: weights [{weights}]  loss {result.loss:.4f} (base {result.base_loss:.4f})  "
          f"objective {result.objective:.4f} after {args.steps} evaluations -> {args.out}")
    return 0
