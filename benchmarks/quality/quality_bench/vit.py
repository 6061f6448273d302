"""The image track's model: a small vision transformer, its masked-image pre-training on a
broad mixture of the installed images, per-task fine-tuning and linear probes.

ViT (Dosovitskiy et al., 2021) at toy scale: 28x28 grey images cut into 7x7 patches (16
tokens and a class token), pre-norm blocks, the class token's final state as the feature.
Pre-training is SimMIM (Xie et al., 2022): half the patches replaced by a learned mask
token, a linear decoder regresses their pixels (L1). Only the encoder (``ViT``) is
merged; the mask token and the decoder stay with the pre-training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quality_bench.images import rotate
from quality_bench.training import Resumable, schedule


@dataclass(frozen=True)
class ViTConfig:
    image: int = 28
    patch: int = 7
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Images [n, 1, H, W] -> features [n, dim] (the class token after the final norm)."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tokens = (cfg.image // cfg.patch) ** 2
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.dim)
        self.cls_embed = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.hidden_size = cfg.dim

    def init(self, seed: int) -> "ViT":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif name.endswith("weight"):  # LayerNorm gains
                    p.fill_(1.0)
                else:
                    p.zero_()
        return self

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # [n, tokens, p*p]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_embed.expand(len(tokens), -1, -1), tokens], 1) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.patch_embed(self.patches(x)))[:, 0]


# -- pre-training ------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainRecipe:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    mask_ratio: float = 0.5
    seed: int = 0
    #: cap on the pre-training images (a random subset; None: all)
    max_images: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Broaden the mixture: random rotation (+-30 degrees), mirror, and intensity inversion of a tenth."""
    n = len(x)
    x = rotate(x, (torch.rand(n, generator=g) - 0.5) * 60)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    inv = torch.rand(n, generator=g) < 0.1
    return torch.where(inv.view(-1, 1, 1, 1), 1 - x, x)


def pretrain(model: ViT, images: torch.Tensor, recipe: PretrainRecipe, log=None, checkpoint: Path | None = None) -> dict:
    """SimMIM on ``images``: mask ``mask_ratio`` of the patches, regress their pixels (L1).
    ``checkpoint``: a file the loop's state is saved to every 50 steps and resumed from."""
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    if recipe.max_images is not None and recipe.max_images < len(images):
        images = images[torch.randperm(len(images), generator=g)[:recipe.max_images]]
    p2 = model.cfg.patch ** 2
    mask_token = nn.Parameter(torch.zeros(1, 1, model.cfg.dim))
    decoder = nn.Linear(model.cfg.dim, p2)
    params = list(model.parameters()) + [mask_token] + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    per_epoch = len(images) // recipe.batch_size
    steps = per_epoch * recipe.epochs
    sched = schedule(opt, steps, recipe.warmup, "cosine")
    t0, loss_avg, start, order = time.monotonic(), None, 0, None
    saver = Resumable(checkpoint)
    state = saver.load()
    if state is not None:
        model.load_state_dict(state["model"])
        decoder.load_state_dict(state["decoder"])
        with torch.no_grad():
            mask_token.copy_(state["mask_token"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["g"])
        torch.set_rng_state(state["rng"])
        loss_avg, start, order = state["loss_avg"], state["step"], state["order"]
        if log:
            log(f"    pre-training resumed at step {start}/{steps} from {checkpoint}")
    model.train()
    n_mask = round(recipe.mask_ratio * model.tokens)
    for step in range(start, steps):
        i = step % per_epoch
        if i == 0:
            order = torch.randperm(len(images), generator=g)
        x = augment(images[order[i * recipe.batch_size:(i + 1) * recipe.batch_size]], g)
        target = model.patches(x)
        tokens = model.patch_embed(target)
        masked = torch.rand(len(x), model.tokens, generator=g).argsort(1) < n_mask
        tokens = torch.where(masked.unsqueeze(-1), mask_token.expand_as(tokens), tokens)
        pred = decoder(model.encode(tokens)[:, 1:])
        loss = (pred - target).abs()[masked].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if log and ((step + 1) % per_epoch == 0 or (step + 1) % 100 == 0):
            log(f"    pre-training step {step + 1}/{steps} (epoch {step // per_epoch + 1}/{recipe.epochs}): masked-pixel L1 "
                f"{loss_avg:.4f}, {(time.monotonic() - t0) / (step + 1 - start):.3f}s/step")
        saver.save(step + 1, lambda: {"model": model.state_dict(), "decoder": decoder.state_dict(), "mask_token": mask_token.detach(),
                                      "opt": opt.state_dict(), "sched": sched.state_dict(), "g": g.get_state(),
                                      "rng": torch.get_rng_state(), "loss_avg": loss_avg, "order": order})
    saver.finish()
    model.eval()
    return {"steps": steps, "final_loss": loss_avg, "seconds": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)
