"""Options shared by the commands that read a model's data: ``stats``, ``search``, ``eval``."""

from __future__ import annotations

import argparse

FAMILIES = ("encoder", "sequence-classification", "causal-lm")  # alloykit.eval.loading.FAMILIES (not imported: start-up)

TASK_HELP = ("built-in task names (e.g. wordnet_pos) or task files (TASK.yaml naming the data files per split, the "
             "head and the metric; see docs/data-dependent.md)")
DATA_HELP = ("a .txt file (one text per line) or a .jsonl file (one {\"text\": ..., \"label\": ...} object per line, "
             "label optional)")
HEAD_HELP = ("the head that scores the tasks: a fine-tuned *ForSequenceClassification folder (its classifier, run on "
             "MODEL's body), or a heads.safetensors holding TASK.weight [classes, hidden] and TASK.bias (a linear head "
             "on MODEL's pooled hidden states). Default: the task file's 'head:', else a heads.safetensors in or beside "
             "MODEL holding the task's key, else MODEL's own head (sequence classification) or next-token distribution "
             "(causal LM)")


def add_model_args(p: argparse.ArgumentParser, *, head: bool = True, heads_per_model: bool = False) -> None:
    """--model-class, --pooling and (``head``) --head / --head-key."""
    p.add_argument("--model-class", choices=FAMILIES,
                   help="the model family (default: from config.json's architectures: *ForCausalLM, "
                        "*ForSequenceClassification, anything else an encoder)")
    p.add_argument("--pooling", choices=["mean", "cls"],
                   help="how an encoder's hidden states reach a heads.safetensors head: mean over the tokens, or the "
                        "first (CLS) token (default: the task file's, else the folder's sentence-transformers setting, "
                        "else mean)")
    if head and heads_per_model:
        p.add_argument("--head", nargs="+", dest="heads", help="one head per model (or one for all): " + HEAD_HELP)
    elif head:
        p.add_argument("--head", help=HEAD_HELP)
        p.add_argument("--head-key", help="the head's key in a heads.safetensors (default: the task's name)")


def add_max_len(p: argparse.ArgumentParser, causal: int) -> None:
    p.add_argument("--max-len", type=int, help=f"tokens per text (default: the task file's max_len, else 32 for built-in "
                   f"tasks, 128 for other classification data, {causal} for causal LMs)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine, 2 threads "
                   "ran the per-example Fisher 25 times slower)")


def set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))
