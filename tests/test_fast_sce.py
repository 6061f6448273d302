"""SCE's fast path with its energies folded into the radix select's second pass.

``sparse_fast.sce`` adds up the selected task vectors' energies while it looks for the
variance cut's exact key: the entries above the cut's bucket at once, the bucket's own
entries kept and decided once the key is known (ties at the cut in flat order). Where the
bucket exceeds ``SCE_CUT_BUDGET`` the energies take a pass of their own. Checked here on
tensors streamed in blocks of a few rows, against the reference (``sparse.sce``) and
against each other:

* the folded energies are the separate pass's to the bit, and so is the merged tensor;
* both are the reference's energies to a relative 1e-6 (float64 row sums against torch's
  float32 mean), and the merged tensor its to 1e-6 of its largest entry;
* on quantized task vectors whose variances tie across the cut (flat order decides which
  equal variances are kept), at block sizes that split the tie group between blocks.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alloykit.methods import sparse, sparse_fast
from alloykit.methods.registry import MergeInput, NoParams
from alloykit.methods.stream import StreamInput
from alloykit.ops import jit, sparsify

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")


def stream(stack: torch.Tensor, base: torch.Tensor, fraction: float, block_entries: int) -> StreamInput:
    """A StreamInput reading rows of in-memory tensors (the executor reads them from checkpoints)."""

    def read(r0: int, r1: int, out: torch.Tensor, base_out: torch.Tensor | None) -> None:
        out.view(stack.shape[0], r1 - r0, -1).copy_(stack[:, r0:r1].reshape(stack.shape[0], r1 - r0, -1))
        base_out.view(r1 - r0, -1).copy_(base[r0:r1].reshape(r1 - r0, -1))

    return StreamInput("t", tuple(base.shape), stack.shape[0], True, SimpleNamespace(select_topk=fraction),
                       [NoParams()] * stack.shape[0], None, read, torch.empty(base.shape), block_entries)


def fast(stack, base, fraction, block_entries, monkeypatch, budget=None):
    """The fast path's output, its energies and its passes over the inputs."""
    energies = []
    original = sparse_fast._SceBlocks.energies

    def record(self):
        energies.append(original(self))
        # asking twice gives the same answer (the energies once added the cut's rows into the stored sums)
        assert np.array_equal(original(self), energies[-1], equal_nan=True)
        return energies[-1]

    with monkeypatch.context() as mp:
        mp.setattr(sparse_fast._SceBlocks, "energies", record)
        if budget is not None:
            mp.setattr(sparse_fast, "SCE_CUT_BUDGET", budget)
        x = stream(stack, base, fraction, block_entries)
        assert sparse_fast.sce(x)
    return x._out.view(base.shape).clone(), energies[0], x.passes


def reference_energies(stack: torch.Tensor, base: torch.Tensor, fraction: float) -> np.ndarray:
    tvs = (stack - base).double()
    keep = sparsify.variance_topk_mask((stack - base), fraction)
    return (tvs * keep).square().mean(dim=tuple(range(1, tvs.dim()))).numpy()


def family(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(37, 29, generator=g)
    if kind == "gaussian":
        return base + 0.1 * torch.randn(3, 37, 29, generator=g), base
    # a few distinct task-vector values: few distinct variances, each shared by many entries
    base = base.bfloat16().float()
    return base + 0.25 * torch.randint(-2, 3, (3, 37, 29), generator=g).float(), base


def cut_is_tied(stack: torch.Tensor, base: torch.Tensor, fraction: float) -> bool:
    var = torch.var(stack - base, dim=0, unbiased=False).flatten()
    k = int(int(torch.count_nonzero(var)) * fraction)
    ordered = var.sort(descending=True).values
    return 0 < k < ordered.numel() and bool(ordered[k - 1] == ordered[k])


@pytest.mark.parametrize("kind,fraction", [("gaussian", 0.3), ("gaussian", 0.9), ("quantized", 0.3),
                                           ("quantized", 0.55)])
def test_folded_energies_are_the_separate_pass_bit_for_bit_and_the_reference(kind, fraction, monkeypatch):
    stack, base = family(kind)
    if kind == "quantized":  # the case the fold must order: equal variances straddle the cut
        assert cut_is_tied(stack, base, fraction)
    want = sparse.sce(MergeInput("t", stack.clone(), base, sparse.SceParams(select_topk=fraction), [NoParams()] * 3))
    ref_energy = reference_energies(stack, base, fraction)
    first = None
    for block_entries in (29, 29 * 5, 29 * 37):  # one row a block (a tie group split between blocks), a few, all
        folded, energy, passes = fast(stack, base, fraction, block_entries, monkeypatch)
        assert passes == 3
        separate, energy_apart, passes_apart = fast(stack, base, fraction, block_entries, monkeypatch, budget=0)
        assert passes_apart == 4
        assert np.array_equal(energy, energy_apart), (energy, energy_apart)
        assert torch.equal(folded.view(torch.int32), separate.view(torch.int32))
        np.testing.assert_allclose(energy, ref_energy, rtol=1e-6)
        assert float((folded - want).abs().max()) <= 1e-6 * float(want.abs().max())
        first = folded if first is None else first
        assert torch.equal(folded.view(torch.int32), first.view(torch.int32))  # any block size


def test_the_budget_counts_the_cut_bucket(monkeypatch):
    """Exactly at the budget the fold runs; one byte short, the energies take their pass."""
    stack, base = family("quantized")
    var = torch.var(stack - base, dim=0, unbiased=False).flatten()
    k = int(int(torch.count_nonzero(var)) * 0.3)
    cut = var.sort(descending=True).values[k - 1]
    in_bucket = int(((var.view(torch.int32) >> 16) == int(cut.view(torch.int32)) >> 16).sum())
    need = in_bucket * (2 + 4 * 3)
    assert fast(stack, base, 0.3, 29, monkeypatch, budget=need)[2] == 3
    assert fast(stack, base, 0.3, 29, monkeypatch, budget=need - 1)[2] == 4
    assert sparse_fast.sce_scratch(10**9, 3, None) == sparse_fast.SCE_CUT_BUDGET
    assert sparse_fast.sce_scratch(1000, 3, None) == 1000 * 14


def test_non_finite_task_vectors_are_the_separate_pass(monkeypatch):
    """NaN and inf task vectors have a NaN variance, which the radix select ranks above
    every other: selected first, their energies not finite; more of them than the
    selection keeps puts the cut among them (the folded pass orders them as the separate
    one does). Not compared with the reference, whose threshold comparisons (NaN > cut)
    leave NaN variances out of the selection instead."""
    stack, base = family("gaussian")
    for count in (600, 3):
        s = stack.clone()
        flat = s.view(3, -1)
        flat[0, :count:2] = float("nan")
        flat[1, 1:count:2] = float("inf")
        folded, energy, passes = fast(s, base, 0.3, 29 * 3, monkeypatch)
        separate, energy_apart, _ = fast(s, base, 0.3, 29 * 3, monkeypatch, budget=0)
        assert passes == 3
        assert np.array_equal(energy, energy_apart, equal_nan=True)
        assert not np.isfinite(energy[:2]).any() and np.isfinite(energy[2])
        assert torch.equal(folded.view(torch.int32), separate.view(torch.int32))
