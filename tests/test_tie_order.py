"""Equal magnitudes straddling a trim's cut are kept as mergekit keeps them (issue 12.5).

mergekit trims with ``torch.argsort(|t|, descending=True)[:k]`` (TIES) and
``torch.sort(|t|).indices[b:b + n]`` (Model Breadcrumbs): unstable sorts, so which of
several equal magnitudes survive is decided by torch's sort kernel (libstdc++'s introsort
in the Linux wheels). ``alloykit.ops.tie_order`` follows that sort's partitions to the cut
instead of running it. Checked here against torch's sort on arrays full of ties, and, end
to end, against mergekit 0.1.5 run in process on fine-tunes whose weight decay shrank
untouched rows of a quantized base by one factor (tens of equal magnitudes per value,
straddling every cut), in float32.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import alloykit  # noqa: E402
from alloykit.ops import jit, tie_order  # noqa: E402
from alloykit.plan import executor  # noqa: E402
from alloykit.testing.fixtures import LlamaShape, write_llama  # noqa: E402

mk_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

needs_jit = pytest.mark.skipif(not jit.available(), reason="numba is not installed")


def _torch_kept(mags: torch.Tensor, tie_key: int, descending: bool, start: int, stop: int) -> np.ndarray:
    order = torch.sort(mags, descending=descending).indices.numpy()
    ties = np.nonzero(mags.view(torch.int32).numpy() == tie_key)[0]
    return np.isin(ties, order[start:stop])


@needs_jit
def test_following_the_sort_keeps_what_torch_sort_keeps():
    if not tie_order.torch_sort_is_introsort():
        pytest.skip("this torch's sort is not libstdc++'s introsort: the fast path sorts with torch instead")
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(2, 50_000 if trial % 5 == 0 else 600, (1,), generator=g))
        distinct = int(torch.randint(1, 40, (1,), generator=g))
        mags = torch.randint(0, distinct, (n,), generator=g).float().mul_(0.5)
        keys = mags.view(torch.int32).numpy()
        descending = bool(trial % 2)
        start = int(torch.randint(0, n, (1,), generator=g)) if not descending else 0
        stop = int(torch.randint(start + 1, n + 1, (1,), generator=g))
        order = np.sort(keys)[::-1] if descending else np.sort(keys)
        for tie_key in {int(order[start]), int(order[stop - 1])}:  # the groups at the window's ends
            kept = tie_order.sort_kept_ties(keys.copy(), tie_key, descending, start, stop)
            assert kept is not None
            assert np.array_equal(kept.astype(bool), _torch_kept(mags, tie_key, descending, start, stop)), trial


# --------------------------------------------------------------------------------------
# end to end against mergekit
# --------------------------------------------------------------------------------------

SHAPE = LlamaShape(vocab=200, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def decayed(tmp_path_factory):
    """A base with quantized weights (multiples of 1/64) and three float32 fine-tunes: every
    entry shrunk by the fine-tune's weight decay, a few rows trained (random deltas)."""
    root = tmp_path_factory.mktemp("decayed")
    base = write_llama(root / "base", SHAPE, seed=0)
    sd = {}
    for f in sorted(base.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    sd = {k: (v * 64).round() / 64 for k, v in sd.items()}
    save_file(sd, str(next(base.glob("*.safetensors"))), metadata={"format": "pt"})
    tunes = []
    g = torch.Generator().manual_seed(1)
    for i, decay in enumerate((0.01, 0.02, 0.005)):
        folder = write_llama(root / f"ft{i + 1}", SHAPE, seed=0)
        tuned = {}
        for name, t in sd.items():
            t = t * (1 - decay)
            if t.dim() == 2:
                rows = torch.rand(t.shape[0], generator=g) < 0.05  # trained rows
                t[rows] += 0.05 * torch.randn(int(rows.sum()), t.shape[1], generator=g)
            tuned[name] = t
        save_file(tuned, str(next(folder.glob("*.safetensors"))), metadata={"format": "pt"})
        tunes.append(folder)
    return base, tunes


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _both(recipe: dict, tmp: Path) -> tuple[dict, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    mk_merge.run_merge(cfg, str(tmp / "mk"), MergeOptions(write_model_card=False, quiet=True))
    alloykit.merge(str(path), tmp / "ak", progress=False)
    return _load(tmp / "mk"), _load(tmp / "ak")


PER = {
    "ties": [{"weight": 0.5, "density": 0.3}, {"weight": 0.7, "density": 0.5}, {"weight": 1.1, "density": 0.7}],
    "breadcrumbs": [{"weight": 0.5, "density": 0.6, "gamma": 0.05}, {"weight": 0.7, "density": 0.8, "gamma": 0.1},
                    {"weight": 1.1, "density": 0.5, "gamma": 0.2}],
}


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_equal_magnitudes_at_the_cut_kept_as_mergekit_keeps_them(decayed, method, path, tmp_path, monkeypatch):
    base, tunes = decayed
    if path == "reference":
        monkeypatch.setattr(executor, "streams", lambda job, plan, device: False)
    elif not jit.available():
        pytest.skip("numba is not installed")
    per = PER["ties" if method == "ties" else "breadcrumbs"]
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(t), "parameters": p} for t, p in zip(tunes, per)]}
    # the case is real: in every 2-D tensor equal magnitudes straddle a cut
    deltas = (_load(tunes[0])["model.embed_tokens.weight"] - _load(base)["model.embed_tokens.weight"]).abs().flatten()
    k = int(0.3 * deltas.numel())
    cut = deltas.sort(descending=True).values[k - 1]
    assert int((deltas == cut).sum()) > 20 and int((deltas > cut).sum()) < k
    mk, ak = _both(recipe, tmp_path)
    for name in mk:
        scale = float(mk[name].abs().max())
        # one tied entry kept differently moves an entry by ~ decay * |base| ~ 1e-3
        assert float((ak[name] - mk[name]).abs().max()) <= 1e-6 * scale, name
