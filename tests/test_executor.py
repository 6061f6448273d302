"""The optimised paths of the executor and of the hot ops give the reference path's bytes.

Each test runs the same merge two ways (whole tensors vs streamed row blocks, one worker
vs four, stacks from the slab vs fresh memory, passes in blocks vs over the whole tensor)
and asserts bit-identical results, comparing raw bits so that signed zeros count too.
The methods' fast paths against their references: tests/test_fast_paths.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from alloykit.io.checkpoint import Checkpoint
from alloykit.merge import plan_recipe
from alloykit.methods import sparse
from alloykit.ops import consensus, sparsify
from alloykit.plan import executor
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import merge_in_memory

# odd sizes: row blocks, slab regions and passes in blocks end mid-tensor
SHAPE = LlamaShape(vocab=301, hidden=48, intermediate=100, layers=2, heads=4, kv_heads=2)

PARAMS = {
    "linear": {"weight": 0.7},
    "task_arithmetic": {"weight": 0.6},
    "ties": {"weight": 0.5, "density": 0.4},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.6},
    "breadcrumbs": {"weight": 0.5, "density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.8, "gamma": 0.05},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.2},
    "model_stock": None,
}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16fam")
    return write_family(root, 3, SHAPE, dtype=torch.bfloat16, shard_bytes=40_000, delta_scale=0.02)


def recipe(family, method: str, **shared) -> dict:
    base, tunes = family
    per = PARAMS.get(method)
    r = {"merge_method": method, "dtype": "bfloat16",
         "models": [{"model": str(t), **({"parameters": per} if per else {})} for t in tunes]}
    if method != "linear":  # linear has no base: a base_model would be one more input
        r["base_model"] = str(base)
    if method == "slerp":
        r["models"], r["parameters"] = r["models"][:1], {"t": 0.3}
    if shared:
        r["parameters"] = shared
    return r


def run(r: dict, **kw) -> dict[str, torch.Tensor]:
    return merge_in_memory(r, seed=7, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def whole_tensors(monkeypatch) -> None:
    """Run every job whole (the methods' reference functions on full float32 stacks)."""
    monkeypatch.setattr(executor, "streams", lambda job, plan, device: False)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_blocks_equal_whole_tensors(bf16_family, method, monkeypatch):
    r = recipe(bf16_family, method)
    with monkeypatch.context() as mp:
        whole_tensors(mp)
        whole = run(r, threads=1)
    for elements in (1000, 64 * 48, 5000, 1 << 40):  # 20 rows, 64 rows, 104 rows, everything per block
        monkeypatch.setattr(executor, "BLOCK_ELEMENTS", elements)
        assert_same(whole, run(r, threads=1))
        assert_same(whole, run(r, threads=3))


def test_which_jobs_stream(bf16_family):
    """On the CPU: methods with a fast path (numba available) and elementwise ones; never a
    copied tensor, never on another device."""
    cpu = torch.device("cpu")
    for method, streamed in (("linear", True), ("task_arithmetic", True), ("ties", True), ("tsv_m", False)):
        plan = plan_recipe(recipe(bf16_family, method))
        embed = next(j for j in plan.jobs if j.name == "model.embed_tokens.weight")
        assert executor.streams(embed, plan, cpu) == streamed, method
        assert not executor.streams(embed, plan, torch.device("meta"))
        plan.close()


@pytest.mark.parametrize("method", sorted(PARAMS) + ["slerp"])
def test_one_worker_equals_four_and_the_slab_equals_fresh_memory(bf16_family, method):
    r = recipe(bf16_family, method)
    one = run(r, threads=1)
    assert_same(one, run(r, threads=4))
    assert_same(one, run(r, threads=4, budget_bytes=50_000))  # most stacks do not fit the slab: fresh memory


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della", "task_arithmetic"])
def test_passes_in_blocks_equal_one_pass(bf16_family, method, monkeypatch):
    """The ops' block sizes change how a tensor is cut, never a bit of the result."""
    r = recipe(bf16_family, method)
    whole_tensors(monkeypatch)  # the reference functions' own blocks
    monkeypatch.setattr(sparsify, "BLOCK", 1 << 40)
    monkeypatch.setattr(sparse, "_BLOCK", 1 << 40)
    ref = run(r, threads=1)
    for block in (997, 4096):
        monkeypatch.setattr(sparsify, "BLOCK", block)
        monkeypatch.setattr(sparse, "_BLOCK", block)
        assert_same(ref, run(r, threads=2))


def test_consensus_variants_through_the_fused_path(bf16_family):
    for shared in ({"consensus_method": "count"}, {"normalize": False}, {"lambda": 0.7, "rescale": True}):
        r = recipe(bf16_family, "ties", **shared)
        assert_same(run(r, threads=1), run(r, threads=3))


def test_elected_disjoint_equals_the_three_steps():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        k, n = 1 + trial % 5, 1 + (trial * 37) % 3000
        d = torch.randn(k, n, generator=g)
        d[torch.rand(k, n, generator=g) < 0.4] = 0.0
        d[torch.rand(k, n, generator=g) < 0.1] = -0.0
        if trial % 3 == 0:
            d = d.round()  # many sums of exactly zero
        w = torch.randn(k, 1, generator=g) if trial % 4 else torch.ones(k, 1)
        if trial % 7 == 0 and k > 1:
            w[1] = -w[0]  # agreeing weights that cancel: divisor 0 -> 1
        for method in ("sum", "count"):
            agree = consensus.agreement_mask(d, consensus.elect_sign(d, method))
            assert torch.equal(bits(consensus.elected_disjoint(d, method)), bits(consensus.disjoint_sum(d, agree)))
            ref = consensus.disjoint_mean(d, agree, weights=w)
            assert torch.equal(bits(consensus.elected_disjoint(d, method, w)), bits(ref)), (trial, method)


def _cases():
    g = torch.Generator().manual_seed(1)
    for shape in [(7,), (300, 1000), (3, 5, 7), (70_001,)]:
        base = torch.randn(shape, generator=g).bfloat16().float()
        yield (base + 0.01 * torch.randn(shape, generator=g)).bfloat16().float() - base  # bf16 deltas: many ties
        yield torch.randint(-3, 4, shape, generator=g).float()  # massive ties, zeros


def test_in_place_trims_equal_mask_multiplication(monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK", 4099)
    for t in _cases():
        for density in (0.0, 0.01, 0.3, 0.9, 1.0):
            for at_least_one in (True, False):
                ref = t * sparsify.magnitude_mask(t, density, at_least_one=at_least_one)
                got = sparsify.magnitude_trim_(t.clone(), density, at_least_one=at_least_one)
                assert torch.equal(bits(got), bits(ref))
            for gamma in (0.0, 0.05):
                ref = t * sparsify.outlier_mask(t, density, gamma)
                assert torch.equal(bits(sparsify.outlier_trim_(t.clone(), density, gamma)), bits(ref))


def test_masks_equal_a_stable_sort(monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK", 4099)
    for t in _cases():
        flat = t.reshape(-1)
        order = torch.sort(flat.abs(), stable=True).indices  # ascending, ties by flat index
        n = flat.numel()
        for k in (1, n // 3, n - 1):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(-flat.abs(), stable=True).indices[:k]] = True
            assert torch.equal(sparsify.top_magnitude_mask(t, k).reshape(-1), ref)
        for start, stop in ((n // 4, 3 * n // 4), (1, n - 1)):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[order[start:stop]] = True
            assert torch.equal(sparsify.magnitude_window_mask(t, start, stop).reshape(-1), ref)


def test_della_ranks_by_sorting_keys_equal_the_stable_argsort():
    g = torch.Generator().manual_seed(2)
    for t in list(_cases()) + [torch.randn(40, 33, generator=g)]:
        rows = t.reshape(1, -1) if t.dim() < 2 else t
        if rows.dim() != 2:
            continue
        fast = sparsify.della_keep_probability(t, 0.5, 0.2)
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        ranks = torch.empty(rows.shape).scatter_(1, order, torch.arange(rows.shape[1], dtype=torch.float32).expand_as(order).contiguous())
        ref = ((0.5 - 0.2) + ranks / max(1, rows.shape[1] - 1) * 2 * 0.2).clamp_(0, 1).reshape(t.shape)
        assert torch.equal(bits(fast), bits(ref))


def test_slab_first_fit_and_coalescing():
    slab = executor._Slab(4 * 1000)
    a, b, c = slab._take(100), slab._take(200), slab._take(300)
    assert (a, b, c) == (0, 112, 320)  # rounded up to 16 entries
    assert slab._take(500) is None  # 384 entries left
    slab._give(b, 200)
    assert slab._take(150) == 112  # first fit: the hole
    slab._give(a, 100)
    slab._give(112, 150)
    slab._give(c, 300)
    assert slab.free == [(0, 1000)]


def test_read_into_a_buffer(bf16_family):
    base, _ = bf16_family
    ck = Checkpoint(base)
    name = "model.layers.0.mlp.up_proj.weight"
    buf = torch.empty(ck.info(name).shape, dtype=torch.bfloat16)
    assert ck.read(name, out=buf) is buf and torch.equal(buf, ck.read(name))
    with pytest.raises(ValueError, match="need a contiguous"):
        ck.read(name, out=torch.empty(buf.shape, dtype=torch.float32))
    ck.close()


def test_nonfinite_inputs_warn_once_per_tensor_in_blocks(bf16_family, monkeypatch, tmp_path):
    from safetensors.torch import load_file, save_file

    base, tunes = bf16_family
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tunes[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = next(f for f in sorted(bad.glob("*.safetensors")) if "model.embed_tokens.weight" in load_file(str(f)))
    sd = load_file(str(shard))
    sd["model.embed_tokens.weight"][5] = float("inf")
    sd["model.embed_tokens.weight"][250] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    r = recipe((base, [bad, tunes[1]]), "linear")
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(r, threads=1)
    msgs = [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]
    assert msgs == [f"tensor 'model.embed_tokens.weight': an input holds NaN or Inf (model '{bad}')",
                    "tensor 'model.embed_tokens.weight': the merged result holds NaN or Inf"]
    from alloykit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="embed_tokens.*an input"):
        run(r, threads=1, fail_on_nonfinite=True)


def test_run_jobs_restores_threads_and_malloc_settings(bf16_family):
    before = torch.get_num_threads()
    run(recipe(bf16_family, "ties"), threads=2)
    assert torch.get_num_threads() == before
    assert executor._malloc_users == [0]
