"""The two tracks of the benchmark: what is merged, its tasks and data, and how it is scored.

A track owns one working encoder module (state dicts are loaded into it for each
evaluation), the base state dict, the tasks' splits, and how a batch of inputs becomes
features. The benchmark (:mod:`quality_bench.bench`) only talks to this interface, so a
new track (a causal LM, say) is one more class here.

* ``TextTrack``: MiniLM (``sentence-transformers/all-MiniLM-L6-v2``), mean-pooled, text
  classification tasks from :mod:`alloykit.eval` plus the benchmark's derived ones.
* ``ImageTrack``: a small ViT pre-trained here (SimMIM) on a broad mixture of the
  installed images, image tasks of :mod:`quality_bench.images`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alloykit.eval.model import base_model_path, encode, forward, load_encoder, load_tokenizer
from alloykit.eval.tasks import get_task
from alloykit.search.adamerging import HeadEntropy, softmax_entropy
from alloykit.stats.collect import Example, Target, score_encoder
from quality_bench import images, text_tasks
from quality_bench.training import Data, Recipe
from quality_bench.vit import PretrainRecipe, ViT, ViTConfig, pretrain


@dataclass
class TrackConfig:
    tasks: list[str]
    recipe: Recipe
    #: fine-tuning seeds: every task is fine-tuned once per seed
    seeds: tuple[int, ...] = (0, 1, 2)
    #: steps of the jointly trained multi-task model (round robin over the tasks; seed 0 only); 0: none
    joint_steps: int = 0
    n_test: int = 500
    n_val: int = 100
    n_train: int | None = None
    #: training examples per task for the linear probes on the frozen base
    n_probe: int = 2000
    #: training examples per task for the statistics of fisher, regmean and regmean++
    n_stats: int = 256
    #: image track: the base's pre-training (None for text)
    pretrain: PretrainRecipe | None = None
    vit: ViTConfig | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


class Track:
    """Shared machinery; subclasses provide the model and the data."""

    name = "track"
    hidden = 0

    def __init__(self, cfg: TrackConfig, cache: Path, log=print):
        self.cfg, self.cache, self.log = cfg, Path(cache) / self.name, log
        self.tasks = list(cfg.tasks)
        self._data: dict[tuple[str, str], Data] = {}
        self.module = self.load_base()
        self.base_sd = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- to provide ----------------------------------------------------------------------
    def load_base(self) -> nn.Module:
        raise NotImplementedError

    def base_id(self) -> str:
        """What identifies the base (part of every fine-tune's cache key)."""
        raise NotImplementedError

    def _split(self, task: str, split: str) -> Data:
        raise NotImplementedError

    def n_classes(self, task: str) -> int:
        raise NotImplementedError

    def features(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def task_info(self, task: str) -> dict:
        raise NotImplementedError

    def stats_target(self, module: nn.Module, task: str, head: nn.Linear) -> tuple[Target, list[Example]]:
        raise NotImplementedError

    def entropy_objective(self, module: nn.Module, heads: dict[str, nn.Linear], split: str, n: int | None):
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def data(self, task: str, split: str) -> Data:
        if (task, split) not in self._data:
            self._data[task, split] = self._split(task, split)
        return self._data[task, split]

    def data_fingerprint(self, task: str) -> str:
        d = self.data(task, "train")
        h = hashlib.sha256(task.encode())
        h.update(d.labels.numpy().tobytes())
        h.update(self._inputs_bytes(d))
        return h.hexdigest()[:16]

    def _inputs_bytes(self, d: Data) -> bytes:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, sd: dict[str, torch.Tensor] | None, data: Data, batch_size: int = 256) -> torch.Tensor:
        """Features of every row of ``data`` under the encoder ``sd`` (None: the base)."""
        self.module.load_state_dict(sd if sd is not None else self.base_sd)
        self.module.eval()
        order = torch.argsort(data.lengths, stable=True) if hasattr(data, "lengths") else torch.arange(len(data))
        out = torch.empty(len(data), self.hidden)
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = self.features(self.module, data.batch(idx))
        return out

    def correct(self, sd: dict[str, torch.Tensor] | None, heads: dict[str, nn.Linear], task: str, split: str) -> torch.Tensor:
        """Per-example correctness (bool [n]) of the encoder ``sd`` with ``heads[task]`` on one split."""
        data = self.data(task, split)
        with torch.no_grad():
            return heads[task](self.embed(sd, data)).argmax(-1) == data.labels

    def fingerprint(self) -> dict:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = {"base": self.base_id(), "tasks": {t: self.data_fingerprint(t) for t in self.tasks}}
        return self._fingerprint


# -- text ------------------------------------------------------------------------------------
class TextTrack(Track):
    name = "text"

    def load_base(self) -> nn.Module:
        text_tasks.register()
        self.base_path = base_model_path()
        self.tokenizer = load_tokenizer(self.base_path)
        module = load_encoder(self.base_path)
        self.hidden = module.config.hidden_size
        self._splits = {t: get_task(t).splits(seed=0, n_test=self.cfg.n_test, n_val=self.cfg.n_val,
                                               n_train=self.cfg.n_train) for t in self.tasks}
        return module

    def base_id(self) -> str:
        h = hashlib.sha256((self.base_path / "config.json").read_bytes())
        return f"minilm-{h.hexdigest()[:12]}"

    def _split(self, task: str, split: str) -> Data:
        return encode(self.tokenizer, getattr(self._splits[task], split), self.cfg.recipe.max_len or 32)

    def _inputs_bytes(self, d) -> bytes:
        return d.ids.numpy().tobytes()

    def n_classes(self, task: str) -> int:
        return len(self._splits[task].labels)

    def features(self, module, inputs) -> torch.Tensor:
        return forward(module, *inputs)

    def task_info(self, task: str) -> dict:
        t, s = get_task(task), self._splits[task]
        return {"description": t.description, "source": t.source, "classes": len(s.labels),
                "train": len(s.train), "val": len(s.val), "test": len(s.test)}

    def stats_target(self, module, task, head):
        data = self.data(task, "train").head(self.cfg.n_stats)
        examples = [Example(data.ids[i, :int(data.lengths[i])], int(data.labels[i]), task) for i in range(len(data))]
        return Target(module, task, score_encoder, heads={task: head}), examples

    def entropy_objective(self, module, heads, split, n):
        data = [self.data(t, split) if n is None else self.data(t, split).head(n) for t in self.tasks]
        return HeadEntropy(module, [heads[t] for t in self.tasks], data, list(self.tasks))


# -- images ----------------------------------------------------------------------------------
@dataclass
class ImageData:
    x: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def head(self, n: int) -> "ImageData":
        return ImageData(self.x[:n], self.labels[:n])


def score_image(examples: list[Example], target: Target):
    """``Target.score`` for images: each example's ``ids`` holds its flattened image."""
    x = torch.stack([e.ids for e in examples]).view(len(examples), 1, 28, 28)
    feats = target.module(x)
    logits = torch.stack([target.heads[e.head](f) for e, f in zip(examples, feats)])
    labels = torch.tensor([e.label for e in examples])
    return logits.unsqueeze(1), labels.unsqueeze(1), torch.ones(len(examples), 1, dtype=torch.long)


@dataclass
class ImageEntropy:
    """AdaMerging's objective for the image track: each task's head entropy on its unlabelled images."""

    module: nn.Module
    heads: list[nn.Linear]
    data: list[ImageData]
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        for h in self.heads:
            h.requires_grad_(False)

    def size(self, task: int) -> int:
        return len(self.data[task])

    def entropy(self, params, task, idx):
        feats = torch.func.functional_call(self.module, params, (self.data[task].batch(idx),))
        return softmax_entropy(self.heads[task](feats)).mean()


class ImageTrack(Track):
    name = "image"

    def load_base(self) -> nn.Module:
        cfg = self.cfg
        self._splits = {t: images.TASKS[t].splits(n_test=cfg.n_test, n_val=cfg.n_val, n_train=cfg.n_train)
                        for t in self.tasks}
        vit = cfg.vit or ViTConfig()
        self.hidden = vit.dim
        module = ViT(vit)
        rec = cfg.pretrain or PretrainRecipe()
        key = hashlib.sha256(json.dumps({"vit": vit.to_dict(), "recipe": rec.to_dict(), "n_test": cfg.n_test,
                                         "n_val": cfg.n_val, "v": 1}, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.cache / "base" / key
        self._base_key = key
        if (folder / "meta.json").is_file():
            module.load_state_dict(load_file(folder / "model.safetensors"))
            self.base_meta = {**json.loads((folder / "meta.json").read_text()), "cached": True}
        else:
            imgs = images.pretraining_images(n_test=cfg.n_test, n_val=cfg.n_val)
            self.log(f"  pre-training the image base (SimMIM) on {len(imgs)} images, {rec.epochs} epochs")
            module.init(rec.seed)
            t0 = time.process_time()
            folder.parent.mkdir(parents=True, exist_ok=True)
            meta = pretrain(module, imgs, rec, log=self.log, checkpoint=folder.with_name(key + ".partial.pt"))
            meta.update({"images": len(imgs), "cpu_s": round(time.process_time() - t0, 1), "vit": vit.to_dict(),
                         "parameters": sum(p.numel() for p in module.parameters()),
                         "recipe": rec.to_dict()})
            tmp = folder.with_name(key + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            tmp.replace(folder)
            self.base_meta = {**meta, "cached": False}
        return module.eval()

    def base_id(self) -> str:
        return f"vit-simmim-{self._base_key}"

    def _split(self, task: str, split: str) -> Data:
        s = getattr(self._splits[task], split)
        return ImageData(s.x, s.y)

    def _inputs_bytes(self, d) -> bytes:
        return d.x.numpy().tobytes()

    def n_classes(self, task: str) -> int:
        return len(self._splits[task].labels)

    def features(self, module, inputs) -> torch.Tensor:
        return module(inputs)

    def task_info(self, task: str) -> dict:
        t, s = images.TASKS[task], self._splits[task]
        return {"description": t.description, "source": t.source, "classes": len(s.labels),
                "train": len(s.train), "val": len(s.val), "test": len(s.test)}

    def stats_target(self, module, task, head):
        data = self.data(task, "train").head(self.cfg.n_stats)
        examples = [Example(data.x[i].flatten(), int(data.labels[i]), task) for i in range(len(data))]
        return Target(module, task, score_image, heads={task: head}), examples

    def entropy_objective(self, module, heads, split, n):
        data = [self.data(t, split) if n is None else self.data(t, split).head(n) for t in self.tasks]
        return ImageEntropy(module, [heads[t] for t in self.tasks], data, list(self.tasks))


TRACKS = {"text": TextTrack, "image": ImageTrack}
