"""The benchmark of one track: cached fine-tunes (one per task and seed), scoring, and rows.

1. Fine-tunes: every task once per seed with the track's recipe, cached on disk under a
   key over the recipe, the seed, the base and the task's training data (a rerun reads them).
2. Rows (:mod:`quality_bench.rows`): baselines, every registered merge method (its grid
   point chosen on validation, then scored once on test) and searches. A row runs once per
   fine-tuning seed it is asked for, on that seed's fine-tunes, and records which test
   examples each task got right, so that :mod:`quality_bench.stats` can bootstrap.

Everything returned is JSON-serialisable.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alloykit.eval.model import train_probe
from alloykit.merge import merge_state_dicts
from alloykit.methods.emr import task_state_dict
from alloykit.methods.registry import get_method
from alloykit.stats.collect import collect
from alloykit.stats.sequential import regmean_plus_plus
from quality_bench import grids
from quality_bench.tracks import Track
from quality_bench.training import train

Scores = dict[str, torch.Tensor]  # task -> bool [n] (which examples are right)


@dataclass
class SearchConfig:
    """AdaMerging as published (Yang et al., ICLR 2024): 500 Adam steps at lr 1e-3, lambda
    initialised at 0.3 and clamped to [0, 1], batches of 16 unlabelled TEST inputs per task."""

    steps: int = 500
    lr: float = 1e-3
    init: float = 0.3
    batch_size: int = 16
    split: str = "test"
    #: record the coefficients every this many steps (the AdaMerging study)
    record_every: int = 25


@dataclass
class FineTunes:
    seed: int
    sd: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> encoder state dict
    heads: dict[str, nn.Linear] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)


def pack(correct: torch.Tensor) -> str:
    """Bool [n] -> hex string of the packed bits (JSON-friendly)."""
    import numpy as np

    return np.packbits(correct.numpy().astype(bool)).tobytes().hex()


def unpack(bits: str, n: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8))[:n].astype(bool))


def summarize(scores: Scores) -> dict[str, Any]:
    """Per-task counts, accuracies and the packed per-example bits; the average over tasks."""
    test = {t: {"n": len(c), "correct": int(c.sum()), "accuracy": float(c.float().mean()), "bits": pack(c)}
            for t, c in scores.items()}
    return {"test": test, "avg": sum(r["accuracy"] for r in test.values()) / len(test)}


def mean_accuracy(scores: Scores) -> float:
    return sum(float(c.float().mean()) for c in scores.values()) / len(scores)


class Bench:
    def __init__(self, track: Track, search: SearchConfig | None = None, log=print, merge_seed: int = 0):
        self.track, self.search, self.log, self.merge_seed = track, search or SearchConfig(), log, merge_seed
        self.tasks = list(track.tasks)
        self._ft: dict[int, FineTunes] = {}
        self._stats: dict[tuple, Any] = {}
        self._probes: dict[str, nn.Linear] | None = None

    # -- fine-tunes (cached) ---------------------------------------------------------------
    def _key(self, tasks: list[str], steps: int, seed: int) -> str:
        fp = self.track.fingerprint()
        blob = {"recipe": self.track.cfg.recipe.to_dict(), "steps": steps, "seed": seed, "base": fp["base"],
                "data": [fp["tasks"][t] for t in tasks], "v": 2}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def trained(self, tasks: list[str], steps: int, seed: int, folder: Path, wait: bool = True):
        """Encoder state dict, heads and metadata of a fine-tune on ``tasks``; trained once, then read back.
        A lock file lets processes share the cache: one trains, another reads it afterwards; with
        ``wait`` False, None when another process is training it now."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            return self._trained(tasks, steps, seed, folder)

    def _trained(self, tasks: list[str], steps: int, seed: int, folder: Path) -> tuple[dict, dict[str, nn.Linear], dict]:
        tr = self.track
        if (folder / "meta.json").exists():
            meta = json.loads((folder / "meta.json").read_text())
            hw = load_file(folder / "heads.safetensors")
            heads = {}
            for t in tasks:
                w, b = hw[f"{t}.weight"], hw[f"{t}.bias"]
                heads[t] = nn.Linear(w.shape[1], w.shape[0])
                heads[t].load_state_dict({"weight": w, "bias": b})
                heads[t].eval()
            return load_file(folder / "encoder.safetensors"), heads, {**meta, "cached": True, "folder": str(folder)}
        self.log(f"  fine-tuning {tr.name} on {', '.join(tasks)}: {steps} steps, seed {seed}")
        tr.module.load_state_dict(tr.base_sd)
        t0, c0 = time.monotonic(), time.process_time()
        heads = train(tr.module, tr.features, {t: tr.data(t, "train") for t in tasks}, {t: tr.n_classes(t) for t in tasks},
                      tr.cfg.recipe, seed=seed, steps=steps, hidden=tr.hidden, log=self.log,
                      checkpoint=folder.with_name(folder.name + ".partial.pt"))
        secs, cpu = time.monotonic() - t0, time.process_time() - c0
        sd = {k: v.detach().clone().contiguous() for k, v in tr.module.state_dict().items()}
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(sd, tmp / "encoder.safetensors")
        save_file({f"{t}.{k}": v.detach().contiguous() for t, h in heads.items() for k, v in h.state_dict().items()},
                  tmp / "heads.safetensors")
        meta = {"tasks": tasks, "steps": steps, "seed": seed, "seconds": round(secs, 1), "cpu_s": round(cpu, 1),
                "s_per_step": round(secs / steps, 3), "recipe": tr.cfg.recipe.to_dict(), "threads": torch.get_num_threads()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return sd, heads, {**meta, "cached": False, "folder": str(folder)}

    def finetunes(self, seed: int) -> FineTunes:
        """The seed's fine-tune of every task. Tasks another process is training are skipped and
        come back to, so two processes sharing the cache train different ones at once."""
        if seed not in self._ft:
            ft = FineTunes(seed)
            steps = self.track.cfg.recipe.steps
            pending = list(self.tasks)
            while pending:
                for t in list(pending):
                    folder = self.track.cache / "finetunes" / f"{t}-s{seed}-{self._key([t], steps, seed)}"
                    got = self.trained([t], steps, seed, folder, wait=len(pending) == 1)
                    if got is None:
                        continue
                    sd, heads, meta = got
                    ft.sd[t], ft.heads[t], ft.meta[t] = sd, heads[t], meta
                    pending.remove(t)
                    if not meta["cached"]:
                        self.log(f"  fine-tune {t} seed {seed}: {meta['seconds']}s")
                if pending:
                    time.sleep(5)  # every pending one is being trained by another process
            ft.sd = {t: ft.sd[t] for t in self.tasks}  # task order, whatever order they came in
            ft.heads = {t: ft.heads[t] for t in self.tasks}
            ft.meta = {t: ft.meta[t] for t in self.tasks}
            self._ft[seed] = ft
        return self._ft[seed]

    def joint(self) -> tuple[dict, dict[str, nn.Linear], dict]:
        steps = self.track.cfg.joint_steps
        folder = self.track.cache / "joint" / self._key(self.tasks, steps, 0)
        return self.trained(self.tasks, steps, 0, folder)

    # -- scoring ---------------------------------------------------------------------------
    def score(self, sd: dict | None, heads: dict[str, nn.Linear], tasks: list[str], split: str) -> Scores:
        return {t: self.track.correct(sd, heads, t, split) for t in tasks}

    def probes(self) -> dict[str, nn.Linear]:
        """Linear probes on the frozen base's features of up to ``n_probe`` training examples per task."""
        if self._probes is None:
            tr = self.track
            self._probes = {}
            for t in self.tasks:
                data = tr.data(t, "train")
                sub = data.head(min(tr.cfg.n_probe, len(data)))
                self._probes[t] = train_probe(tr.embed(None, sub), sub.labels, tr.n_classes(t), seed=0)
        return self._probes

    # -- merging ---------------------------------------------------------------------------
    def task_stats(self, seed: int, task: str, kind: str) -> dict:
        """Statistics ``kind`` (fisher, gram) of a fine-tune on its task's first ``n_stats`` training
        examples, collected once per run (held in memory)."""
        key = (seed, task, kind)
        if key not in self._stats:
            ft = self.finetunes(seed)
            module = copy.deepcopy(self.track.module)
            module.load_state_dict(ft.sd[task])
            target, examples = self.track.stats_target(module, task, copy.deepcopy(ft.heads[task]).requires_grad_(False))
            tensors, _ = collect(target, examples, kind, log=lambda msg: None)
            self._stats[key] = tensors
        return self._stats[key]

    def merged_stats(self, seed: int, tasks: list[str], alpha: float) -> list[dict]:
        """RegMean++'s Grams (inputs of the merged earlier blocks), once per seed, task list and alpha."""
        key = (seed, tuple(tasks), "merged", alpha)
        if key not in self._stats:
            ft = self.finetunes(seed)
            targets, examples = [], []
            for t in tasks:
                module = copy.deepcopy(self.track.module)
                module.load_state_dict(ft.sd[t])
                target, ex = self.track.stats_target(module, t, copy.deepcopy(ft.heads[t]).requires_grad_(False))
                targets.append(target)
                examples.append(ex)
            _, grams, _ = regmean_plus_plus(targets, examples, alpha=alpha, log=lambda msg: None)
            self._stats[key] = [{"gram": g} for g in grams]
        return self._stats[key]

    def merge(self, method: str, point: grids.Point, seed: int, tasks: list[str], side: dict | None = None) -> dict:
        """The merged encoder of the seed's fine-tunes of ``tasks`` by ``method`` at grid ``point``."""
        spec = get_method(method)
        shared, per_model = point
        ft = self.finetunes(seed)
        if spec.stats_inputs == "merged":
            stats = self.merged_stats(seed, tasks, shared.get("alpha", 0.9))
        elif spec.needs_stats:
            stats = [self.task_stats(seed, t, spec.needs_stats) for t in tasks]
        else:
            stats = None
        return merge_state_dicts([ft.sd[t] for t in tasks], method, base=None if spec.base == "ignored" else self.track.base_sd,
                                 parameters=shared or None, model_parameters=[dict(per_model) for _ in tasks] if per_model else None,
                                 seed=self.merge_seed, stats=stats, side_outputs=side)

    def merged_scores(self, method: str, point: grids.Point, seed: int, tasks: list[str], split: str,
                      merged: tuple[dict, dict] | None = None) -> tuple[Scores, tuple[dict, dict]]:
        """Scores of a merge on ``tasks``, and the merge (state dict, side outputs) for reuse on another
        split. EMR is scored per task, each task on its own model rebuilt from the unified model, its
        mask and its rescaler (the paper's protocol)."""
        heads = self.finetunes(seed).heads
        if merged is None:
            side: dict = {}
            merged = (self.merge(method, point, seed, tasks, side if method == "emr" else None), side)
        sd, side = merged
        if method != "emr":
            return self.score(sd, heads, tasks, split), merged
        return {t: self.track.correct(task_state_dict(sd, self.track.base_sd, side, i), heads, t, split)
                for i, t in enumerate(tasks)}, merged
