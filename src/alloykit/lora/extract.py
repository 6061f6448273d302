"""Extract a PEFT LoRA adapter from a fine-tune: truncated SVD of each linear layer's delta.

For every 2-D weight W (not an embedding, unless ``embed_lora``) with delta
D = W_ft - W_base, keep the top ``rank`` singular triplets (randomized subspace iteration,
``alloykit.ops.lowrank``, within 0.1% of the Eckart-Young least error): D ~ U_r S_r V_r^T,
stored as lora_B = U_r S_r^(1/2) and lora_A = S_r^(1/2) V_r^T with lora_alpha = r
(scale 1). Changed embeddings and 1-D tensors (norms) are saved whole as
``modules_to_save``, or skipped. mergekit-extract-lora's options are accepted under its
names (``AdapterOptions``).

The fine-tune is read through the same planner and executor as a merge (a ``passthrough``
recipe of the one model, computed in float32), and the adapter is written by the same
writer as ``merge --output-lora`` (``alloykit.output.adapter``), through the crash-safe
output folder: a killed extraction leaves no target.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloykit.io.checkpoint import Checkpoint
from alloykit.output.adapter import AdapterOptions, LayerReport, summary, write_adapter
from alloykit.output.model import Written
from alloykit.request import MergeRequest

__all__ = ["AdapterOptions", "LayerReport", "extract", "extract_lora", "summary"]


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, rank: int | AdapterOptions,
                 **kwargs) -> list[LayerReport]:
    """Write a PEFT adapter folder ``out`` approximating ``finetuned - base`` at ``rank``;
    returns one report per tensor (keyword arguments: those of ``extract``)."""
    return extract(finetuned, base, out, rank, **kwargs).reports or []


def extract(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    rank: int | AdapterOptions,
    *,
    save_others: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
    threads: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> Written:
    """``extract_lora`` with every option (an ``AdapterOptions`` for ``rank``); returns what was
    written (``already_done`` when ``resume`` found this very adapter finished at ``out``)."""
    options = rank if isinstance(rank, AdapterOptions) else AdapterOptions(rank, save_others=save_others)
    options.check()
    ft_ref, base_ref = str(finetuned), str(base)
    request = MergeRequest.of({"merge_method": "passthrough", "models": [{"model": ft_ref}], "out_dtype": "float32"},
                              allow_pickle=allow_pickle)
    record = {"extract_lora": {"model": ft_ref, "base_model": base_ref, "max_rank": options.rank,
                               **{k: v for k, v in vars(options).items() if k != "rank"}}}
    record["extract_lora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in record["extract_lora"].items()}
    plan = request.plan()
    base_ck = None
    try:
        base_ck = Checkpoint(base, allow_pickle=allow_pickle, label=base_ref)
        return write_adapter(plan, base_ck, out, options, what="extract-lora", record=record, merged_refs=[ft_ref],
                                base_ref=base_ref, names_dir=Path.cwd(), device=device, threads=threads,
                                progress=progress, overwrite=overwrite, resume=resume)
    finally:
        plan.close()
        if base_ck is not None:
            base_ck.close()
