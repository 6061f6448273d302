"""The interference methods' fast paths (MagMax, Consensus TA, PCB) against their references.

* The kernels against torch on hand-made edge cases: ties and NaN in MagMax's argmax,
  ``exp32`` against float64's exp, Consensus TA's model-order sum against torch's for K <= 4.
* Through the executor on a Llama-shaped family (odd sizes: blocks end mid-row):
  MagMax and Consensus TA (K = 3) bit for bit; Consensus TA at K = 6 (where torch's
  strided sum adds some entries in another order) within a stated count of flipped masks;
  PCB within 1e-6 of the tensor's largest entry except where a score lies within 1e-5
  of its task's threshold (float64 scores, computed here), and its threshold equal to
  torch's ``kthvalue`` of the fast path's own scores.
* The same bytes at any block size and thread count; without numba the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alloykit.methods import interference, interference_fast, subspace
from alloykit.methods.registry import MergeInput
from alloykit.methods.stream import StreamInput
from alloykit.ops import fast_interference, jit
from alloykit.plan import executor
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import merge_in_memory

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")

SHAPE = LlamaShape(vocab=301, hidden=48, intermediate=100, layers=2, heads=4, kv_heads=2)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


def test_magmax_kernel_ties_and_nan_as_torchs_argmax():
    tau = torch.tensor([[1.0, -2.0, 3.0, float("nan"), 0.5, -0.0, 4.0],
                        [-1.0, 2.0, -3.0, 9.0, float("nan"), 0.0, float("nan")],
                        [0.5, 2.0, 3.0, float("nan"), 7.0, -0.0, -4.0]])
    base = torch.arange(7, dtype=torch.float32)
    for lam in (1.0, 0.7):
        ref = subspace.magmax(MergeInput("w", tau + base, base, subspace.MagMaxParams(**{"lambda": lam}), [None] * 3))
        out = np.empty(7, dtype=np.float32)
        # tau + base - base is not tau: compare with the reference on the same deltas
        d = ((tau + base) - base).numpy()
        fast_interference.magmax_merge(d.copy(), base.numpy(), np.float32(lam), lam != 1, out)
        assert torch.equal(bits(torch.from_numpy(out)), bits(ref))
    # the first of equal magnitudes wins (torch's argmax): column 0, model 0's +1 over model 1's -1;
    # column 1, model 0's -2 over the +2 of models 1 and 2; a NaN anywhere in a column wins it
    assert out[0] == np.float32(0.0 + 1.0 * np.float32(0.7)) and out[1] < 1.0 and np.isnan(out[3])


def test_exp32_is_within_two_ulp_of_exp():
    x = np.concatenate([np.linspace(-87, 0, 200_001, dtype=np.float32), np.float32([-1.0, -0.5, 0.0, -3.0])])
    out = np.empty_like(x)

    @np.vectorize
    def one(v):
        return fast_interference.exp32(np.float32(v))

    out[:] = one(x)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert float(np.max(np.abs(out - exact) / ulp)) <= 2.0
    assert out[-2] == 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_consensus_kernel_is_the_reference_bit_for_bit_up_to_four_models(k):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(20_011, generator=g)
    tunes = base + torch.randn(k, 20_011, generator=g) * torch.logspace(-2, 1, k).view(-1, 1)
    tunes[:, :50] = base[:50]  # zero task vectors (tau_MTL = +0)
    tunes[0, 60:70] = float("nan")
    for lambda_t, kk, alpha in ((0.4, 1, 1.0), (0.4, min(2, k), 1.3), (1.5, k, 0.5)):
        params = subspace.ConsensusParams(k=kk, lambda_t=lambda_t, alpha=alpha)
        ref = subspace.consensus_ta(MergeInput("w", tunes.clone(), base, params, [None] * k))
        out = np.empty(20_011, dtype=np.float32)
        d = (tunes - base).numpy()
        fast_interference.consensus_merge(d, base.numpy(), np.float32(lambda_t), np.float32(kk), np.float32(alpha),
                                          alpha != 1, out, np.empty(20_011, dtype=np.float32))
        assert torch.equal(bits(torch.from_numpy(out)), bits(ref)), (lambda_t, kk, alpha)


# --------------------------------------------------------------------------------------
# through the executor
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def family(request, tmp_path_factory):
    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(f"interf-{request.param}")
    return write_family(root, 6, SHAPE, dtype=dtype, shard_bytes=40_000, delta_scale=0.5 if dtype == torch.float32
                        else 0.02)


def recipe(family, method: str, params: dict, n: int = 3) -> dict:
    base, tunes = family
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(t)} for t in tunes[:n]],
            "dtype": "float32", "parameters": params}


def reference(r: dict, monkeypatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as mp:
        mp.setattr(executor, "streams", lambda job, plan, device: False)
        return merge_in_memory(r, threads=1)


def streamed_everywhere(r: dict) -> None:
    from alloykit.merge import plan_recipe

    plan = plan_recipe(r)
    try:
        assert all(executor.streams(j, plan, torch.device("cpu")) for j in plan.jobs if not j.copy)
    finally:
        plan.close()


EXACT = {  # name -> (method, parameters)
    "magmax": ("magmax", {}),
    "magmax lambda": ("magmax", {"lambda": 0.6}),
    "consensus_ta": ("consensus_ta", {}),
    "consensus_ta k3": ("consensus_ta", {"k": 3, "lambda_t": 0.2, "alpha": 1.5}),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_fast_path_is_the_reference_bit_for_bit(family, case, monkeypatch):
    method, params = EXACT[case]
    r = recipe(family, method, params)
    streamed_everywhere(r)
    ref = reference(r, monkeypatch)
    fast = merge_in_memory(r, threads=1)
    assert fast.keys() == ref.keys()
    for name in ref:
        assert torch.equal(bits(fast[name]), bits(ref[name])), name


def test_consensus_with_six_models_flips_only_masks_at_their_threshold(family, monkeypatch):
    """K = 6: torch's sum(0) adds some entries in another order than model order (ILP
    partial sums in the tail of its vectorized loop), so tau_MTL may differ in its last
    bit there and a TALL mask within rounding of its threshold may flip. Bound: every
    entry within 1e-6 of the tensor's largest entry, except at most 1 in 10,000."""
    r = recipe(family, "consensus_ta", {"k": 3}, n=6)
    ref = reference(r, monkeypatch)
    fast = merge_in_memory(r, threads=1)
    total = flipped = 0
    for name in ref:
        scale = float(ref[name].abs().max())
        far = (fast[name] - ref[name]).abs() > 1e-6 * scale
        total += ref[name].numel()
        flipped += int(far.sum())
    assert flipped <= total // 10_000, (flipped, total)


PCB = {"pcb": {"density": 0.2}, "pcb dense": {"density": 0.7, "lambda": 0.8}, "pcb all": {"density": 1.0}}


def near_thresholds(family, density: float, n: int = 3, rel: float = 1e-5) -> dict[str, torch.Tensor]:
    """Per tensor, the entries where some task's score (PCB's formula in float64) is within
    ``rel`` of that task's threshold: only there may two float32 computations of the
    scores (torch's expf and sums, the fast path's) keep different entries."""
    from alloykit.io.checkpoint import Checkpoint

    base_dir, tunes = family
    base = Checkpoint(base_dir)
    cks = [Checkpoint(t) for t in tunes[:n]]
    near = {}
    for name in base.tensors:
        b = base.read(name).double()
        tau = torch.stack([c.read(name).double().reshape(-1) - b.reshape(-1) for c in cks])
        d = tau.shape[1]
        rank = min(d - 1, int((1 - density) * d))

        def soft(v, scale=1.0):
            lo, hi = v.min(), v.max()
            v = (v - lo) / (hi - lo) * scale if hi > lo else torch.zeros_like(v)
            e = torch.exp(v - v.max())
            return e * (d / e.sum())

        mask = torch.zeros(d, dtype=torch.bool)
        for a in range(n):
            beta = soft(tau[a] * tau[a], n) * sum(soft(tau[a] * tau[j]) for j in range(n))
            threshold = beta.kthvalue(rank + 1).values
            mask |= (beta - threshold).abs() <= rel * threshold
        near[name] = mask.view(b.shape)
    for c in (base, *cks):
        c.close()
    return near


@pytest.mark.parametrize("case", sorted(PCB))
def test_pcb_fast_path_within_tolerance_of_the_reference(family, case, monkeypatch):
    """Within 1e-6 of the tensor's largest entry (measured: 1.2e-7) wherever no task's score
    is within 1e-5 of its threshold (float64 scores); near a threshold an entry may be kept
    by one and dropped by the other (such entries are few: at most 1% of the model here;
    measured: none flipped)."""
    params = PCB[case]
    r = recipe(family, "pcb", params)
    streamed_everywhere(r)
    ref = reference(r, monkeypatch)
    fast = merge_in_memory(r, threads=1)
    near = near_thresholds(family, params["density"])
    flipped = 0
    for name in ref:
        scale = float(ref[name].abs().max())
        far = (fast[name] - ref[name]).abs() > 1e-6 * scale
        assert not (far & ~near[name]).any(), name
        flipped += int(far.sum())
    n_near = sum(int(m.sum()) for m in near.values())
    assert flipped <= n_near <= sum(t.numel() for t in ref.values()) // 100


def stream_of(tunes: torch.Tensor, base: torch.Tensor, params, block_entries: int) -> StreamInput:
    """A StreamInput over in-memory tensors (the executor's reader, without a checkpoint)."""
    k, shape = tunes.shape[0], tuple(base.shape)
    x = StreamInput("w", shape, k, True, params, [None] * k, None, lambda *a: None, torch.empty(shape),
                    block_entries=block_entries)

    def read(r0, r1, stack, base_buf):
        stack.view(k, -1).copy_(tunes.reshape(k, x.rows, -1)[:, r0:r1].reshape(k, -1))
        base_buf.copy_(base.reshape(x.rows, -1)[r0:r1].reshape(-1))

    x._read = read
    return x


def test_pcb_threshold_is_kthvalue_and_every_entry_is_merged_with_it():
    """The radix select finds exactly the score torch's kthvalue finds (ties included), and
    the merge pass applies it: bit for bit ``pcb_merge`` over the whole tensor at once."""
    g = torch.Generator().manual_seed(3)
    for shape, density in (((37, 53), 0.2), ((5000,), 0.5), ((64, 64), 0.9), ((7, 3), 0.01), ((40, 25), 1.0)):
        base = torch.randn(shape, generator=g)
        tunes = base + (torch.randn(3, *shape, generator=g) * 0.1).bfloat16().float()  # coarse: many equal scores
        x = stream_of(tunes, base, interference.PcbParams(density=density, **{"lambda": 0.9}), 100)
        scores = interference_fast._PcbScores(x)
        assert scores.prepare(x)
        beta = np.concatenate([scores.of(b, b.deltas()).copy() for b in x.blocks()], axis=1)
        keys = interference_fast.merge_by_scores(x, scores)
        for a in range(3):
            want = interference.top_fraction_threshold(torch.from_numpy(beta[a]), density)
            assert int(keys[a]) == int(want.view(torch.int32)), (shape, density, a)
        d = np.ascontiguousarray((tunes - base).reshape(3, -1).numpy())
        want = np.empty(x.numel, dtype=np.float32)
        fast_interference.pcb_merge(d, beta, keys, base.reshape(-1).numpy(), np.float32(0.9), want,
                                    np.empty_like(want), np.empty_like(want))
        assert torch.equal(bits(x._out), bits(torch.from_numpy(want))), (shape, density)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pcb_any_model_count_and_shape(k):
    """One to four models; 0-d, one-entry, 1-D and 2-D tensors in blocks of 50 entries."""
    g = torch.Generator().manual_seed(k)
    for shape in ((), (1,), (5,), (37, 11), (300, 7)):
        base = torch.randn(shape, generator=g)
        tunes = base + torch.randn(k, *shape, generator=g)
        params = interference.PcbParams(density=0.3)
        ref = interference.pcb(MergeInput("w", tunes.clone(), base, params, [None] * k))
        x = stream_of(tunes, base, params, 50)
        assert interference_fast.pcb(x)
        out = x._out.view(shape)
        assert float((out - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), (k, shape)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e20])
def test_pcb_declines_nonfinite_products_to_the_reference(bad):
    x = StreamInput("w", (4, 3), 2, True, interference.PcbParams(), [None] * 2, None, lambda *a: None,
                    torch.empty(4, 3), block_entries=3)

    def read(r0, r1, stack, base_buf):
        stack.fill_(1.0)
        if r0 == 2:  # in the third block, not the first
            stack[1, 1] = bad  # 3e20 is finite, its square is not
        base_buf.zero_()

    x._read = read
    assert interference_fast.pcb(x) is False


# --------------------------------------------------------------------------------------
# the contract: any block size and thread count; without numba the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,params,n", [("magmax", {"lambda": 0.6}, 3), ("consensus_ta", {"k": 2}, 5),
                                             ("pcb", {"density": 0.3}, 3), ("pcb", {"density": 0.5}, 4)])
def test_same_bytes_at_any_block_size_and_thread_count(family, method, params, n, monkeypatch):
    r = recipe(family, method, params, n=n)
    one = merge_in_memory(r, threads=1)
    for threads, elements in ((3, None), (2, 1), (2, 997), (1, 1 << 20)):
        if elements is not None:
            monkeypatch.setattr(executor, "BLOCK_ELEMENTS", elements)
        other = merge_in_memory(r, threads=threads)
        for name in one:
            assert torch.equal(bits(other[name]), bits(one[name])), (name, threads, elements)


@pytest.mark.parametrize("method", ["magmax", "consensus_ta", "pcb"])
def test_without_numba_the_reference(family, method, monkeypatch):
    r = recipe(family, method, {})
    ref = reference(r, monkeypatch)
    monkeypatch.setenv("ALLOYKIT_NO_JIT", "1")
    jit.available.cache_clear()
    try:
        assert not jit.available()
        got = merge_in_memory(r, threads=2)  # magmax, consensus_ta: the reference on row blocks
        for name in ref:
            assert torch.equal(bits(got[name]), bits(ref[name])), name
    finally:
        monkeypatch.delenv("ALLOYKIT_NO_JIT")
        jit.available.cache_clear()


def test_passes_per_tensor(family, monkeypatch):
    """PCB: extremes, softmax sums, two radix-select histograms, merge; the others one pass."""
    seen: list[StreamInput] = []
    init = StreamInput.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(StreamInput, "__init__", recording)
    for method, want in (("pcb", 5), ("magmax", 1), ("consensus_ta", 1)):
        seen.clear()
        merge_in_memory(recipe(family, method, {}), threads=1)
        assert seen and {x.passes for x in seen} == {want}, (method, {x.name: x.passes for x in seen})
