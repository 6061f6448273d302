"""``alloykit tokensurgeon MODEL DONOR OUT``: give a model a donor's tokenizer."""

from __future__ import annotations

import argparse

from alloykit.errors import RecipeError

#: mergekit-tokensurgeon's --approximation-method values that mean the same here
_MERGEKIT_METHODS = {"omp": "omp", "subword": "pieces", "mean": "mean"}


def add_parser(sub) -> None:
    p = sub.add_parser("tokensurgeon", help="give a model a donor's tokenizer, rebuilding the rows of new tokens",
                       description="Write MODEL with DONOR's tokenizer. Tokens MODEL has keep its rows; the rows of new "
                                   "tokens are rebuilt (--method). Arguments as mergekit-tokensurgeon: MODEL DONOR OUT, "
                                   "or MODEL --donor DONOR OUT.")
    p.add_argument("paths", nargs="+", metavar="MODEL [DONOR] OUT")
    p.add_argument("--donor", help="the model whose tokenizer is transplanted")
    p.add_argument("--method", "-a", "--approximation-method", dest="method", default="omp",
                   help="rows of new tokens: omp (default, as mergekit-tokensurgeon's: orthogonal matching pursuit "
                        "over shared tokens, fitted on the donor's weights), pieces (mean of the rows of the token's "
                        "pieces in the model's tokenizer), mean; mergekit's 'subword' means pieces")
    p.add_argument("-k", "--k", type=int, default=64, help="omp: shared tokens per new token (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="accept PyTorch .bin/.pt inputs (weights_only=True)")
    p.set_defaults(func=cmd_tokensurgeon, extra_paths=True)


def cmd_tokensurgeon(args: argparse.Namespace) -> int:
    from alloykit.transplant import tokensurgeon

    paths = list(args.paths)
    if args.donor is not None:
        paths.insert(1, args.donor)
    if len(paths) != 3:
        raise RecipeError("tokensurgeon: give MODEL DONOR OUT (or MODEL --donor DONOR OUT)")
    method = _MERGEKIT_METHODS.get(args.method, args.method)
    if args.k < 1:
        raise RecipeError(f"tokensurgeon -k {args.k}: must be at least 1")
    out = tokensurgeon(paths[0], paths[1], paths[2], method=method, k=args.k, overwrite=args.overwrite,
                       progress=not args.quiet, allow_pickle=args.allow_pickle)
    print(f"{paths[0]} with the tokenizer of {paths[1]} ({method}) -> {out}")
    return 0
