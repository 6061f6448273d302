"""KnOTS (Stoica et al., ICLR 2025): joint SVD of the LoRA updates, blocks merged, checked
against an independent dense computation of the paper's steps and by loading in PEFT."""


import pytest
import torch

from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.knots import knots_update
from alloykit.methods.registry import MergeInput, get_method
from alloykit.testing.fixtures import write_llama
from alloykit.testing.helpers import run_cli as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def merger(method, weights, **model_params):
    spec = get_method(method)
    per = [spec.model_params.model_validate({"weight": w, **model_params}) for w in weights]
    return lambda stack: spec.fn(MergeInput("w", stack, torch.zeros(stack.shape[1:]), spec.params.model_validate({}), per))


def factors(g, out_dim, in_dim, rank, k):
    return [(torch.randn(out_dim, rank, generator=g), torch.randn(rank, in_dim, generator=g)) for _ in range(k)]


def reference_knots_ties(deltas, density, weights):
    """The paper's steps on dense matrices: SVD of [D_1 ... D_K], blocks S V_i^T, TIES
    (top-k by magnitude per block, sign of the weighted sum, weighted mean of the agreeing)."""
    cat = torch.cat([d.double() for d in deltas], 1)
    u, s, vh = torch.linalg.svd(cat, full_matrices=False)
    keep = s > 1e-6 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    # U S V_i^T = D_i = 0 forces V_i = 0 in exact arithmetic (float64 leaves ~1e-16 there)
    blocks = [s[:, None] * b * bool(d.any()) for b, d in zip(vh.split(deltas[0].shape[1], 1), deltas)]
    trimmed = []
    for b, w in zip(blocks, weights):
        k = max(1, int(density * b.numel()))
        thresh = b.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(w * torch.where(b.abs() >= thresh, b, torch.zeros_like(b)))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    sign[sign == 0] = 1
    agree = (torch.sign(t) == sign) & (t != 0)
    wsum = sum(w * agree[i].double() for i, w in enumerate(weights))
    wsum[wsum == 0] = 1
    merged = (t * agree).sum(0) / wsum
    return (u @ merged).float()


def test_one_adapter_returns_its_own_update():
    g = torch.Generator().manual_seed(0)
    (left, right), = factors(g, 12, 9, 3, 1)
    for method, extra in (("task_arithmetic", {}), ("ties", {"density": 1.0}), ("linear", {})):
        got = knots_update([(left, right)], (12, 9), merger(method, [1.0], **extra))
        torch.testing.assert_close(got, left @ right, rtol=1e-5, atol=1e-5)


def test_linear_knots_of_orthogonal_updates_is_their_sum():
    g = torch.Generator().manual_seed(1)
    q_out = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    q_in = torch.linalg.qr(torch.randn(10, 10, generator=g))[0]
    # update i uses output directions 3i..3i+2 and input directions 3i..3i+2: mutually orthogonal
    fs = [(q_out[:, 3 * i : 3 * i + 3] * (i + 1.0), q_in[:, 3 * i : 3 * i + 3].T.contiguous()) for i in range(3)]
    got = knots_update(fs, (16, 10), merger("task_arithmetic", [1.0, 1.0, 1.0]))
    torch.testing.assert_close(got, sum(l @ r for l, r in fs), rtol=1e-5, atol=1e-5)
    # and the linear average divides by the weights' sum
    got = knots_update(fs, (16, 10), merger("linear", [1.0, 2.0, 1.0]))
    torch.testing.assert_close(got, sum(w * (l @ r) for w, (l, r) in zip((1, 2, 1), fs)) / 4, rtol=1e-5, atol=1e-5)


def test_knots_ties_matches_the_dense_computation_of_the_paper():
    g = torch.Generator().manual_seed(2)
    fs = factors(g, 20, 14, 4, 3)
    fs[1] = (fs[1][0][:, :2], fs[1][1][:2])  # ranks may differ
    weights = [1.0, 0.7, 1.3]
    got = knots_update(fs, (20, 14), merger("ties", weights, density=0.4))
    want = reference_knots_ties([l @ r for l, r in fs], 0.4, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # an adapter that does not touch this weight contributes a zero block
    got = knots_update([fs[0], None], (20, 14), merger("ties", [1.0, 1.0], density=1.0))
    torch.testing.assert_close(got, fs[0][0] @ fs[0][1], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("knots")
    base = write_llama(root / "base")
    for i, targets in ((1, ["q_proj", "up_proj"]), (2, ["q_proj", "v_proj"])):
        torch.manual_seed(10 + i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(root / f"a{i}")
    return root, base


@pytest.mark.parametrize("rank", [8, 3])
def test_cli_knots_adapter_loads_in_peft_within_the_truncation_error(adapters, tmp_path, rank, capsys):
    root, base = adapters
    code, out, err = cli(capsys, "merge-lora", root / "a1", root / "a2", tmp_path / "k", "--base", base,
                         "--method", "knots", "--knots-merge", "ties", "--density", 0.5, "--rank", rank)
    assert code == 0, err
    assert "merged 2 adapters with knots" in out
    cks = [LoraCheckpoint(Checkpoint(base), root / f"a{i}", "a") for i in (1, 2)]
    b = Checkpoint(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "k")
    dense = transformers.AutoModelForCausalLM.from_pretrained(base)
    sd = dense.state_dict()
    merged = peft_model.merge_and_unload().state_dict()
    for name in cks[0]._deltas.keys() | cks[1]._deltas.keys():
        ds = [ck.delta(name) if ck.delta(name) is not None else torch.zeros(b.info(name).shape) for ck in cks]
        want = reference_knots_ties(ds, 0.5, [1.0, 1.0])
        sd[name] = b.read(name) + want
        s = torch.linalg.svdvals(want.double())
        err = torch.linalg.vector_norm((merged[name] - b.read(name) - want).double())
        torch.testing.assert_close(err, s[rank:].square().sum().sqrt(), rtol=1e-3, atol=1e-4)
    if rank == 8:  # the merged updates have rank <= 8: the adapter is exact, so is PEFT's forward
        dense.load_state_dict(sd)
        ids = torch.arange(0, 40).view(2, 20)
        with torch.no_grad():
            got = transformers.AutoModelForCausalLM.from_pretrained(base)
            got = peft.PeftModel.from_pretrained(got, tmp_path / "k")(ids).logits
            torch.testing.assert_close(got, dense(ids).logits, rtol=1e-4, atol=1e-4)
