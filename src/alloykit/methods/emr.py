"""EMR-merging: one unified task vector plus, per task, a mask and a rescaler.

The merge writes the *unified model* theta_0 + tau_uni as the ordinary model files, and,
as side outputs in ``<output>/emr/``:

* ``mask_<t>.safetensors``: task t's mask M_t, one bit per entry (``pack_bits``), keyed
  like the model;
* ``sums.safetensors``: per tensor a float64 [K, 2] tensor of (sum |tau_t|,
  sum |M_t * tau_uni|), from which the rescalers over the whole model are summed;
* ``manifest.json``: the input models (task order), the base, the groups.

``load_task_model(folder, task)`` rebuilds task t's model theta_0 + lambda_t M_t tau_uni.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.side import read_manifest
from alloykit.methods.registry import MergeInput, NoParams, register

SIDE_FOLDER = "emr"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 [ceil(n / 8)], 8 entries a byte (entry i is bit i % 8 of byte i // 8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits``: the bool tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


def emr_unified(tau: torch.Tensor) -> torch.Tensor:
    """tau_uni = sign(sum_t tau_t) * max over the tasks agreeing with that sign of |tau_t| (0 where none agrees)."""
    sign = torch.sign(tau.sum(0))
    mag = torch.zeros_like(sign)
    for t in tau:  # sign * tau_t is |tau_t| where task t agrees, <= 0 where not; one task at a time ([d] temporaries)
        torch.maximum(mag, t * sign, out=mag)
    return mag.mul_(sign)


@register(
    "emr",
    params=NoParams,
    model_params=NoParams,
    side_outputs=True,
    paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging (NeurIPS 2024, "
    "arXiv:2405.17461)",
    base="required",
)
def emr(x: MergeInput) -> torch.Tensor:
    """EMR-merging: elect a unified task vector; store per-task masks and rescalers beside it.

      sigma = sign(sum_t tau_t)                              (elected sign, per entry)
      tau_uni = sigma * max_{t: sigma tau_t > 0} |tau_t|     (0 where no task agrees)
      M_t = [tau_t * tau_uni > 0]                            (task t's mask)
      lambda_t = sum |tau_t| / sum |M_t * tau_uni|           (sums over the whole model)
      merged = theta_0 + tau_uni                             (the "unified model")
    The ordinary output is the unified model. Task t's model theta_0 + lambda_t M_t tau_uni
    needs the side outputs: the masks (one bit per entry) and, per tensor, the two sums of
    lambda_t, written to ``<output>/emr/``; ``alloykit.load_task_model(folder, t)`` adds
    them up over all tensors and rebuilds it. The quality benchmark scores each task on
    its rebuilt model, as the paper does.

    Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging (arXiv:2405.17461).
    """
    tau = x.deltas()
    uni = emr_unified(tau)
    uni_abs = uni.abs()
    sums = torch.zeros(x.k, 2, dtype=torch.float64)
    for t in range(x.k):  # one task at a time: no [K, ...] temporaries on embedding-sized tensors
        mask = tau[t] * uni > 0
        x.emit(f"mask_{t}", pack_bits(mask))
        sums[t, 0] = tau[t].abs().sum(dtype=torch.float64)
        sums[t, 1] = (uni_abs * mask).sum(dtype=torch.float64)
    x.emit("sums", sums)
    return x.base + uni


# --------------------------------------------------------------------------------------
# Per-task reconstruction
# --------------------------------------------------------------------------------------


def _task_index(manifest: dict, task: int | str | os.PathLike, folder: Path) -> int:
    models = manifest["models"]
    if isinstance(task, int) and not isinstance(task, bool):
        if 0 <= task < len(models):
            return task
    else:
        if str(task) in models:
            return models.index(str(task))
        real = os.path.realpath(os.fspath(task))
        if real in manifest.get("model_paths", []):
            return manifest["model_paths"].index(real)
    raise CheckpointError(
        f"EMR merge '{folder}': no task {task!r}; name one of its models {models} or an index 0..{len(models) - 1}"
    )


def task_rescalers(sums: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """lambda_t for every task from the per-tensor (numerator, denominator) sums (1 where nothing is kept)."""
    total = sum(sums.values())
    num, den = total[:, 0], total[:, 1]
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 1.0)


def _task_tensor(merged: torch.Tensor, theta0: torch.Tensor, packed: torch.Tensor, lam: float) -> torch.Tensor:
    """theta_0 + lam * M * (merged - theta_0), computed in float32, in the unified tensor's dtype."""
    theta0 = theta0.float()
    mask = unpack_bits(packed, tuple(merged.shape))
    return (theta0 + lam * mask * (merged.float() - theta0)).to(merged.dtype)


def task_state_dict(
    unified: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], side: Mapping[str, Mapping[str, torch.Tensor]], task: int,
) -> dict[str, torch.Tensor]:
    """``load_task_model`` for an in-memory EMR merge (``merge_state_dicts(..., side_outputs=side)``)."""
    lam = float(task_rescalers(side["sums"])[task])
    masks = side[f"mask_{task}"]
    return {n: _task_tensor(v, base[n], masks[n], lam) if n in masks else v for n, v in unified.items()}


def load_task_model(
    folder: str | os.PathLike,
    task: int | str | os.PathLike,
    base: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of one task of an EMR merge: theta_0 + lambda_t * M_t * tau_uni.

    ``task``: the input model's index (recipe order, base excluded) or its name/path as in
    the recipe. ``base``: the base model (folder or state dict); by default the base the
    manifest records. tau_uni is read as (unified - base) in float32, so with a bf16 or
    fp16 output it carries the unified model's rounding. Tensors the merge copied (no mask)
    come back as in the unified model.
    """
    folder = Path(folder)
    side = folder / SIDE_FOLDER
    manifest = read_manifest(side)
    if manifest is None or manifest.get("method") != "emr":
        raise CheckpointError(f"'{folder}' is not the output of an EMR merge (no {SIDE_FOLDER}/manifest.json); merge with merge_method: emr")
    t = _task_index(manifest, task, folder)
    base_src = base if base is not None else manifest.get("base_path")
    if base_src is None:
        raise CheckpointError(f"EMR merge '{folder}': its base was not a model folder; pass base= (a folder or a state dict)")
    base_ck = None if isinstance(base_src, Mapping) else Checkpoint(base_src, label="base")
    unified = Checkpoint(folder, label=str(folder))
    try:
        with safe_open(side / "sums.safetensors", "pt") as f:
            sums = {k: f.get_tensor(k) for k in f.keys()}
        lam = float(task_rescalers(sums)[t])
        out: dict[str, torch.Tensor] = {}
        with safe_open(side / f"mask_{t}.safetensors", "pt") as masks:
            masked = set(masks.keys())
            for name in unified.tensors:
                merged = unified.read(name)
                if name not in masked:
                    out[name] = merged
                    continue
                theta0 = base_src[name] if base_ck is None else base_ck.read(name)
                out[name] = _task_tensor(merged, theta0, masks.get_tensor(name), lam)
        return out
    finally:
        unified.close()
        if base_ck is not None:
            base_ck.close()
