"""The methods' fast paths against their references, and the kernels under them.

* The random stream: Random123's published known-answer vectors for Philox4x32-10, the
  stream's keep rate, and the numba draws bit for bit against the torch reference.
* Radix-select thresholds against the reference's.
* Every fast path through the executor against the reference function on whole tensors:
  bit for bit where the arithmetic is the same; where a sum over the whole tensor is taken
  in another order (L1 rescaling, energies, inner products of the geometric methods) within
  a relative 1e-6 of the tensor's largest entry (karcher, iterated: 1e-5).
* The seeding contract: the same bytes at any block size and thread count; without numba
  (the reference kernels) the same bytes too; the stream's version in a merge's
  fingerprint, so that ``--resume`` of a merge drawn from another stream is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from alloykit.merge import plan_recipe
from alloykit.ops import fast_random, fast_select, jit, philox, sparsify
from alloykit.plan import executor
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import merge_in_memory, run_cli

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")

# odd sizes: blocks end mid-row and mid-tensor
SHAPE = LlamaShape(vocab=301, hidden=48, intermediate=100, layers=2, heads=4, kv_heads=2)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --------------------------------------------------------------------------------------
# the random stream
# --------------------------------------------------------------------------------------

#: Random123 kat_vectors: philox4x32 10, counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(o) for o in out) == expected
    seed = key[0] | key[1] << 32
    first = counter[0] | counter[1] << 32
    if counter[2] == counter[3] and counter[2] < 2:  # the kernel's counters: (c, model, domain)
        words = np.empty((1, 4), dtype=np.uint64)
        fast_random.philox_words(seed, counter[2], counter[3], first, 1, words)
        assert tuple(int(w) for w in words[0]) == expected


def test_stream_is_a_uniform_on_48_bits_and_keeps_at_the_rate():
    u = philox.uniform48(2024, 3, 17, 200_000)
    assert int(u.min()) >= 0 and int(u.max()) < 2**48
    assert abs(float(u.double().mean()) / 2**48 - 0.5) < 0.005
    for p in (0.1, 0.5, 0.9):
        rate = float(philox.keep_mask(p, 2024, 3, 0, 200_000).float().mean())
        assert abs(rate - p) < 4 * (p * (1 - p) / 200_000) ** 0.5
    # different models, seeds and offsets are different streams; the same ones the same
    a = philox.uniform48(5, 0, 0, 64)
    assert torch.equal(a, philox.uniform48(5, 0, 0, 64))
    assert torch.equal(a[10:], philox.uniform48(5, 0, 10, 54))
    for other in (philox.uniform48(6, 0, 0, 64), philox.uniform48(5, 1, 0, 64)):
        assert not torch.equal(a, other)


@pytest.mark.parametrize("start,count", [(0, 1), (3, 5), (8, 1000), (12345, 777), (2**33 + 5, 100)])
def test_fast_draws_equal_the_reference_stream(start, count):
    lanes = np.empty(8 * (count // 8 + 2), dtype=np.uint32)
    keep = np.empty(count, dtype=np.float32)
    for p in (0.0, 0.3, 0.5, 1.0):
        fast_random.keep_draws(99, 2, start, np.array([philox.threshold48(p)]), True, lanes, keep)
        assert np.array_equal(keep.astype(bool), philox.keep_mask(p, 99, 2, start, count).numpy())
    # per-entry thresholds equal to the draws in their leading 16 bits: the refinement decides
    u = philox.uniform48(99, 2, start, count)
    thresholds = (u + torch.randint(-2, 3, (count,), generator=torch.Generator().manual_seed(start))).clamp(0, 2**48)
    fast_random.keep_draws(99, 2, start, thresholds.numpy(), False, lanes, keep)
    assert np.array_equal(keep.astype(bool), (u < thresholds).numpy())


# --------------------------------------------------------------------------------------
# radix select
# --------------------------------------------------------------------------------------


def test_radix_select_edges_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 5000, (1,), generator=g))
        t = torch.randint(-30, 31, (n,), generator=g).float() * 0.125 if trial % 2 else torch.randn(n, generator=g)
        values = np.ascontiguousarray(t.numpy()[None])
        counts = np.zeros((1, fast_select.HIGH_BUCKETS), dtype=np.int64)
        fast_select.count_high(values.view(np.int32), values, counts, np.zeros((1, 1)), False)
        for rank in {0, n // 3, n - 1}:
            edge = fast_select.Edge(rank)
            edge.locate_bucket(counts[0])
            low = np.zeros((1, 2, fast_select.LOW_BINS), dtype=np.int64)
            fast_select.count_low(values.view(np.int32), values, np.array([[edge.bucket, -1]]), low, np.zeros((1, 2, 1)),
                                  False)
            edge.locate_key(low[0, 0])
            value, n_less, n_equal = sparsify.kth_smallest(t.abs(), rank)
            assert (edge.key, edge.n_less, edge.n_equal) == (int(value.view(torch.int32)), n_less, n_equal)


def test_sce_variance_kernel_is_torchs_bit_for_bit():
    """SCE selects by variance: the fused kernel's must be torch.var's to the bit (ties
    and threshold included), on bf16-quantized task vectors (many equal variances) too."""
    from alloykit.ops import fast_sce

    g = torch.Generator().manual_seed(1)
    for k in (2, 3, 5):
        d = torch.randn(k, 20_011, generator=g)
        for t in (d, d * torch.logspace(-20, 20, d.shape[1]), (d * 0.01).bfloat16().float() - (d * 0.01).round()):
            out = np.empty(t.shape[1], dtype=np.float32)
            fast_sce.variance(np.ascontiguousarray(t.numpy()), out, *np.empty((2, t.shape[1])))
            assert np.array_equal(out.view(np.int32), torch.var(t, dim=0, unbiased=False).numpy().view(np.int32))


def test_sce_erase_kernel_is_the_references_arithmetic_bit_for_bit():
    """Given the same energies, the fused election and disjoint mean are the reference's
    float32 operations (elect_sign, agreement_mask, disjoint_sum, agreeing_weight)."""
    from alloykit.ops import fast_sce
    from alloykit.ops.consensus import agreeing_weight, agreement_mask, disjoint_sum, elect_sign

    g = torch.Generator().manual_seed(2)
    d = torch.randint(-3, 4, (3, 5003), generator=g).float() * torch.rand(3, 5003, generator=g)
    d[:, :40] = 0.0  # no agreeing entry: the divisor 0 becomes 1
    keep = (torch.rand(5003, generator=g) < 0.6).float()
    base = torch.randn(5003, generator=g)
    for c in ([0.2, 0.3, 0.5], [1e-9, 2e-9, 1.0], [1 / 3] * 3):
        cw = torch.tensor(c, dtype=torch.float32).view(-1, 1)
        tvs = d * keep.bool()
        agree = agreement_mask(tvs, elect_sign(tvs, "sum"))
        ref = base + disjoint_sum(tvs * cw, agree) / agreeing_weight(agree, cw).clamp_(min=1e-6)
        out = np.empty(5003, dtype=np.float32)
        fast_sce.erase_merge(d.numpy().copy(), keep.numpy(), cw.view(-1).numpy(), base.numpy(), out,
                             *np.empty((2, 5003), dtype=np.float32))
        assert torch.equal(bits(torch.from_numpy(out)), bits(ref))


# --------------------------------------------------------------------------------------
# every fast path against its reference, through the executor
# --------------------------------------------------------------------------------------

W3 = [0.7, 0.5, 1.2]
CASES = {  # name -> (method, shared parameters, per-model parameters, models, base, exact)
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}, {"weight": W3}, 3, True, True),
    "ties": ("ties", {}, {"weight": W3, "density": [0.4, 0.6, 0.5]}, 3, True, True),
    "ties count": ("ties", {"consensus_method": "count", "normalize": False}, {"weight": W3, "density": [0.3] * 3}, 3,
                   True, True),
    "ties rescale": ("ties", {"rescale": True}, {"weight": W3, "density": [0.4, 0.6, 0.5]}, 3, True, False),
    "breadcrumbs": ("breadcrumbs", {}, {"weight": W3, "density": [0.8, 0.9, 0.7], "gamma": [0.05, 0.01, 0.2]}, 3, True,
                    True),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": True},
                         {"weight": W3, "density": [0.8, 0.5, 0.7], "gamma": [0.05, 0.3, 0.0]}, 3, True, True),
    "dare_linear": ("dare_linear", {}, {"weight": W3, "density": [0.5, 0.3, 1.0]}, 3, True, False),
    "dare_linear raw": ("dare_linear", {"rescale": False}, {"weight": W3, "density": [0.5, 0.3, 0.0]}, 3, True, True),
    "dare_ties": ("dare_ties", {"rescale": False}, {"weight": W3, "density": [0.5] * 3}, 3, True, True),
    "dare_ties rescale": ("dare_ties", {"normalize": True}, {"weight": W3, "density": [0.5, 0.4, 0.6]}, 3, True, False),
    "della": ("della", {"rescale": False}, {"weight": W3, "density": [0.5] * 3, "epsilon": [0.1, 0.2, 0.3]}, 3, True,
              True),
    "della rescale": ("della", {}, {"weight": W3, "density": [0.5] * 3, "epsilon": [0.1] * 3}, 3, True, False),
    "della_linear": ("della_linear", {"rescale": False}, {"weight": W3, "density": [0.4] * 3, "epsilon": [0.2] * 3}, 3,
                     True, True),
    "sce": ("sce", {"select_topk": 0.3}, {}, 3, True, False),
    "sce all": ("sce", {"select_topk": 1.0}, {}, 3, True, False),
    "sce none": ("sce", {"select_topk": 0.0}, {}, 3, True, True),
    "slerp": ("slerp", {"t": 0.3}, {}, 1, True, False),
    "nuslerp": ("nuslerp", {}, {"weight": [0.3, 0.8]}, 2, True, False),
    "nuslerp rows": ("nuslerp", {"nuslerp_flatten": False}, {"weight": [0.3, 0.8]}, 2, True, True),
    "model_stock": ("model_stock", {}, {}, 3, True, False),
    "model_stock filter_wise": ("model_stock", {"filter_wise": True}, {}, 3, True, True),
    "multislerp": ("multislerp", {}, {"weight": W3}, 3, True, False),
    "karcher": ("karcher", {}, {}, 3, False, False),
    # merged in bf16 (the recipe's dtype): mergekit's sort order of tied magnitudes is not followed
    # (alloykit keeps the lower flat index), so the fast path counts tied entries by ordinal instead
    "ties bf16": ("ties", {}, {"weight": W3, "density": [0.4, 0.6, 0.5]}, 3, True, True),
    "breadcrumbs bf16": ("breadcrumbs", {}, {"weight": W3, "density": [0.8, 0.9, 0.7], "gamma": [0.05, 0.01, 0.2]}, 3,
                         True, True),
}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def family(request, tmp_path_factory):
    """A base and three fine-tunes; bf16 task vectors take few distinct values (ties at every cut)."""
    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(f"fast-{request.param}")
    scale = 0.5 if dtype == torch.float32 else 0.02
    return write_family(root, 3, SHAPE, dtype=dtype, shard_bytes=40_000, delta_scale=scale)


def recipe(family, case: str) -> dict:
    method, shared, per, n, with_base, _ = CASES[case]
    base, tunes = family
    models = []
    for i, t in enumerate(tunes[:n]):
        p = {key: values[i] for key, values in per.items()}
        models.append({"model": str(t), **({"parameters": p} if p else {})})
    r = {"merge_method": method, "models": models, "dtype": "bfloat16" if case.endswith(" bf16") else "float32"}
    if with_base:
        r["base_model"] = str(base)
    if shared:
        r["parameters"] = shared
    return r


def run(r: dict, **kw) -> dict[str, torch.Tensor]:
    return merge_in_memory(r, seed=11, **kw)


def reference(r: dict, monkeypatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as mp:
        mp.setattr(executor, "streams", lambda job, plan, device: False)
        return run(r, threads=1)


def assert_close(fast: dict, ref: dict, exact: bool, rtol: float = 1e-6) -> None:
    assert fast.keys() == ref.keys()
    for name in ref:
        if exact:
            assert torch.equal(bits(fast[name]), bits(ref[name])), name
        else:
            scale = float(ref[name].abs().max())
            assert float((fast[name] - ref[name]).abs().max()) <= rtol * max(scale, 1e-30), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_the_reference(family, case, monkeypatch):
    r = recipe(family, case)
    plan = plan_recipe(r)
    assert all(executor.streams(j, plan, torch.device("cpu")) for j in plan.jobs if not j.copy)
    plan.close()
    ref = reference(r, monkeypatch)
    fast = run(r, threads=1)
    assert_close(fast, ref, CASES[case][5], rtol=1e-5 if case == "karcher" else 1e-6)


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties", "ties rescale", "dare_ties rescale", "della rescale",
                                  "sce", "model_stock", "karcher", "multislerp"])
def test_same_bytes_at_any_block_size_and_thread_count(family, case, monkeypatch):
    """The seeding contract: draws keyed by entry, thresholds found exactly, and sums over a
    tensor taken row by row and added exactly, so neither blocks nor workers change a bit."""
    r = recipe(family, case)
    one = run(r, threads=1)
    assert_close(run(r, threads=3), one, exact=True)
    for elements in (1, 997, 1 << 20):
        monkeypatch.setattr(executor, "BLOCK_ELEMENTS", elements)
        assert_close(run(r, threads=2), one, exact=True)


@pytest.mark.parametrize("case", ["ties", "breadcrumbs", "dare_ties", "della", "model_stock", "task_arithmetic"])
def test_without_numba_the_same_bytes(family, case, monkeypatch):
    r = recipe(family, case)
    fast = run(r, threads=2)
    monkeypatch.setenv("ALLOYKIT_NO_JIT", "1")
    jit.available.cache_clear()
    try:
        assert not jit.available()
        assert_close(run(r, threads=2), fast, CASES[case][5])
    finally:
        monkeypatch.delenv("ALLOYKIT_NO_JIT")
        jit.available.cache_clear()


def test_declined_layouts_run_the_reference(family, monkeypatch):
    """DELLA on a 3-D tensor and nuslerp along columns decline: the reference computes them."""
    from alloykit.methods import sparse_fast
    from alloykit.methods.stream import StreamInput

    x = StreamInput("t", (4, 5, 6), 3, True, None, [], 1, lambda *a: None, torch.empty(4, 5, 6))
    assert not sparse_fast._della_streamable(x)
    r = recipe(family, "nuslerp")
    r["parameters"] = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    assert_close(run(r, threads=1), reference(r, monkeypatch), exact=True)


# --------------------------------------------------------------------------------------
# the stream's version in a merge's fingerprint: --resume of a merge drawn otherwise refused
# --------------------------------------------------------------------------------------


def test_resume_of_a_merge_from_another_random_stream_is_refused_in_one_line(family, tmp_path, capsys):
    base, tunes = family
    r = recipe(family, "dare_ties")
    r["seed"] = 3
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", path, out, "-q").code == 0
    manifest = out / "alloykit_manifest.json"
    data = json.loads(manifest.read_text())
    assert data["fingerprint"]["stream"] == philox.STREAM == "philox4x32-10/1"
    assert run_cli(capsys, "merge", path, out, "--resume").code == 0  # same stream: nothing to do
    del data["fingerprint"]["stream"]  # as an alloykit before the counter-based stream wrote it
    manifest.write_text(json.dumps(data))
    result = run_cli(capsys, "merge", path, out, "--resume")
    assert result.code == 2 and "\n" not in result.err, result.err
    assert "the random stream of the DARE/DELLA masks changed (torch's generator then, philox4x32-10/1 now" in result.err
    # a deterministic method's bytes do not depend on the stream: no stream in its fingerprint
    r = recipe(family, "ties")
    path.write_text(yaml.safe_dump(r))
    assert run_cli(capsys, "merge", path, tmp_path / "ties", "-q").code == 0
    assert "stream" not in json.loads((tmp_path / "ties" / "alloykit_manifest.json").read_text())["fingerprint"]


# --------------------------------------------------------------------------------------
# per-tensor statistics once: passes over the inputs per tensor
# --------------------------------------------------------------------------------------

#: passes each fast path makes over a tensor's inputs: the geometric methods one pass for the
#: Gram matrix (every norm, cosine and Karcher iterate follows from it) and one to write,
#: however many iterations karcher takes; the row-wise ones a single pass; SCE four (variance
#: histogram, low key bits, energies, merge)
PASSES = {"slerp": 2, "nuslerp": 2, "model_stock": 2, "multislerp": 2, "karcher": 2, "nuslerp rows": 1,
          "model_stock filter_wise": 1, "sce": 4, "sce all": 2}


@pytest.mark.parametrize("case", sorted(PASSES))
def test_per_tensor_statistics_are_computed_in_one_pass(family, case, monkeypatch):
    passes: dict[str, int] = {}

    class Counting(executor.StreamInput):
        def blocks(self):
            passes[self.name] = passes.get(self.name, 0) + 1
            return super().blocks()

    monkeypatch.setattr(executor, "StreamInput", Counting)
    r = recipe(family, case)
    if case == "karcher":
        r["parameters"] = {"max_iter": 50, "tol": 1e-12}  # many iterations: still no pass of their own
    run(r, threads=1)
    big = passes
    assert big and set(big.values()) == {PASSES[case]}, passes
