"""Twin-Merging (alloykit.moe.twin_merging) against independent references.

The references are built by hand, never through alloykit's merge: the shared model theta_s =
theta_0 + 0.3 sum_k tau_k and the dense models theta_s + sum_k w_k SVD_r(theta_k - theta_s) are
computed here tensor by tensor (torch.linalg.svd for the truncation) and loaded into a plain
copy of the toy; the fine-tunes themselves are the reference for a one-hot router at full rank.
Task k's inputs live on coordinates of block k, so which expert each input needs is known.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alloykit.errors import AlloyError, CheckpointError
from alloykit.moe import twin_merging
from alloykit.moe.routed import TwinLinear, TwinRouter, load_routed_model, pool, save_routed
from alloykit.moe.twin import train_router

from test_routed import BLOCK, D, H, K, Block, bert_family  # the toy block of the SMILE/WEMoE tests (width 24, MLP 32), 3 tasks

LAMBDA = 0.3


class Toy(nn.Module):
    """[batch, tokens, D] -> [batch, tokens, D]; blocks named as a transformer's so the roles find them."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.norm(x)


def family(seed: int = 0) -> tuple[Toy, list[dict]]:
    """A base and K fine-tunes that change every linear (weights and biases) of both blocks; fine-tune k
    changes the up projections most on the coordinates of block k."""
    torch.manual_seed(seed)
    base = Toy().eval()
    tunes = []
    for k in range(K):
        g = torch.Generator().manual_seed(100 + k)
        sd = {n: t.clone() for n, t in base.state_dict().items()}
        for name in sd:
            if ".mlp." in name:
                sd[name] = sd[name] + 0.05 * torch.randn(sd[name].shape, generator=g)
        for i in range(2):
            sd[f"layers.{i}.mlp.up_proj.weight"][:, k * BLOCK:(k + 1) * BLOCK] += torch.randn(H, BLOCK, generator=g)
        tunes.append(sd)
    return base, tunes


def task_inputs(k: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + k)
    x = 0.05 * torch.randn(n, 5, D, generator=g)
    x[..., k * BLOCK:(k + 1) * BLOCK] += 1.0 + torch.randn(n, 5, BLOCK, generator=g)
    return x


def model_of(base: Toy, sd: dict) -> Toy:
    m = copy.deepcopy(base)
    m.load_state_dict(sd)
    return m.eval()


def fixed_router(weights: torch.Tensor) -> TwinRouter:
    """A router that gives every input the weights ``weights`` (softmax of log w)."""
    r = TwinRouter(D, K)
    with torch.no_grad():
        r.net[0].weight.zero_()
        r.net[0].bias.copy_(weights.clamp_min(1e-30).log())
    return r


def shared_by_hand(base: Toy, tunes: list[dict]) -> dict:
    b = base.state_dict()
    return {n: b[n] + LAMBDA * sum(sd[n] - b[n] for sd in tunes) for n in b}


def dense_by_hand(base: Toy, tunes: list[dict], w: torch.Tensor, rank: int | None) -> dict:
    """theta_s + sum_k w_k SVD_rank(theta_k - theta_s) for every linear weight, the full difference
    for their biases (as the paper's exclusive knowledge of a bias vector), theta_s for the norm."""
    shared = shared_by_hand(base, tunes)
    out = dict(shared)
    for n in shared:
        if ".mlp." not in n:
            continue
        for k, sd in enumerate(tunes):
            delta = sd[n] - shared[n]
            if delta.dim() == 2 and rank is not None:
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                delta = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            out[n] = out[n] + w[k] * delta
    return out


def test_full_rank_one_hot_router_reproduces_each_finetune():
    base, tunes = family()
    for k in range(K):
        model = twin_merging(base, tunes, router=fixed_router(F.one_hot(torch.tensor(k), K).float()), rank=64)
        x = torch.cat([task_inputs(j) for j in range(K)])
        torch.testing.assert_close(model(x), model_of(base, tunes[k])(x), atol=2e-5, rtol=1e-5)
        # and a one-hot router is not the shared model: theta_s alone is far from the fine-tune
        assert (model_of(base, shared_by_hand(base, tunes))(x) - model_of(base, tunes[k])(x)).abs().max() > 0.1


@pytest.mark.parametrize("rank", [None, 3])
def test_fixed_router_weights_equal_the_dense_model_by_hand(rank):
    base, tunes = family(1)
    w = torch.tensor([0.5, 0.3, 0.2])
    model = twin_merging(base, tunes, router=fixed_router(w), rank=rank or 64)
    x = torch.cat([task_inputs(j, 8) for j in range(K)])
    torch.testing.assert_close(model(x), model_of(base, dense_by_hand(base, tunes, w, rank))(x), atol=2e-5, rtol=1e-5)
    assert all(m.rank == (rank or D) for m in model.modules() if isinstance(m, TwinLinear))
    torch.testing.assert_close(model.twin_last_weights, w.expand(len(x), K))


def test_trained_router_sends_each_task_to_its_expert_and_each_sample_gets_its_own_model():
    base, tunes = family(2)
    train = [[task_inputs(k, 16, seed=1), task_inputs(k, 16, seed=2)] for k in range(K)]
    model = twin_merging(base, tunes, train, rank=64, steps=200)
    assert model.alloykit_routing["settings"]["router"]["train_accuracy"] == 1.0
    for k in range(K):
        x = task_inputs(k, 40, seed=7)  # held out
        y = model(x)
        w = model.twin_last_weights
        assert (w.argmax(-1) == k).all(), f"task {k} routed to {w.argmax(-1).tolist()}"
        assert float(w[:, k].mean()) > 0.9
        # per sample exactly the dense model theta_s + sum_j w_j(x) (theta_j - theta_s), w from the router
        for i in (0, 17):
            ref = model_of(base, dense_by_hand(base, tunes, w[i], None))(x[i:i + 1])
            torch.testing.assert_close(y[i:i + 1], ref, atol=2e-5, rtol=1e-5)
    mixed = torch.cat([task_inputs(0, 3, seed=9), task_inputs(2, 3, seed=9)])
    alone = torch.cat([model(mixed[i:i + 1]) for i in range(len(mixed))])
    torch.testing.assert_close(model(mixed), alone, atol=1e-5, rtol=1e-5)  # no weighting leaks across a batch


def test_train_router_separates_gaussian_clusters():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 10, generator=g)
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 10, generator=g)
    router = train_router(feats, labels, 4, hidden=16, steps=200)
    test_labels = torch.arange(4).repeat_interleave(20)
    test = centres[test_labels] + torch.randn(80, 10, generator=g)
    assert float((router(test).argmax(-1) == test_labels).float().mean()) > 0.95
    torch.testing.assert_close(router(test).sum(-1), torch.ones(80))


def test_save_load_round_trip(tmp_path):
    base, tunes = family(3)
    train = [[task_inputs(k, 16, seed=1)] for k in range(K)]
    model = twin_merging(base, tunes, train, rank=4, router_hidden=8, steps=50, experts=["a", "b", "c"])
    x = torch.cat([task_inputs(k, 5, seed=4) for k in range(K)])
    y = model(x)
    folder = save_routed(model, tmp_path / "twin")
    record = json.loads((folder / "routed.json").read_text())
    assert record["method"] == "twin_merging" and record["experts"] == ["a", "b", "c"]
    assert record["router"] == {"features": D, "n_experts": K, "hidden": 8, "feature_module": ""}
    assert {s["type"] for s in record["layers"].values()} == {"twin"} and len(record["layers"]) == 4
    loaded = load_routed_model(folder, module=Toy())
    assert torch.equal(loaded(x), y)
    assert torch.equal(loaded.twin_last_weights, model.twin_last_weights)
    again = save_routed(loaded, tmp_path / "again")  # a reloaded model saves the same record
    assert json.loads((again / "routed.json").read_text())["settings"] == record["settings"]
    record["router"]["width"] = 3  # a router entry alloykit does not know: one line, no traceback of TypeError
    (again / "routed.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="router entry"):
        load_routed_model(again, module=Toy())


def test_feature_module_and_attention_mask_pooling():
    base, tunes = family(4)
    train = [[task_inputs(k, 16, seed=1)] for k in range(K)]
    model = twin_merging(base, tunes, train, rank=4, steps=30, feature_module="layers.0")
    assert model.twin_router.feature_module == "layers.0"
    x = task_inputs(1, 4, seed=5)
    model(x)
    hidden = model_of(base, shared_by_hand(base, tunes)).layers[0](x)  # the shared model's block-0 output
    torch.testing.assert_close(model.twin_last_weights, model.twin_router(hidden.mean(1)), atol=1e-5, rtol=1e-5)
    h = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(h, mask), torch.stack([h[0, :2].mean(0), h[1, 0]]))
    torch.testing.assert_close(pool(h), h.mean(1))


class ProjectedToy(Toy):
    """The toy behind an input projection outside the blocks (as a ViT's patch embedding)."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(D, D)

    def forward(self, x):
        return super().forward(self.proj_in(x))


def test_targets_linears_keeps_exclusive_parts_outside_the_blocks_too():
    torch.manual_seed(5)
    base = ProjectedToy().eval()
    _, tunes = family(5)
    for k, sd in enumerate(tunes):
        g = torch.Generator().manual_seed(300 + k)
        sd.update({n: v + 0.2 * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items() if n.startswith("proj_in")})
        sd.update({n: v for n, v in base.state_dict().items() if n not in sd})
    x = task_inputs(1, 6)
    one_hot = fixed_router(F.one_hot(torch.tensor(1), K).float())
    routed = twin_merging(base, tunes, router=one_hot, rank=64, targets="linears")
    assert isinstance(routed.proj_in, TwinLinear)
    torch.testing.assert_close(routed(x), model_of(base, tunes[1])(x), atol=2e-5, rtol=1e-5)
    blocks_only = twin_merging(base, tunes, router=copy.deepcopy(one_hot), rank=64, targets="blocks")
    assert isinstance(blocks_only.proj_in, nn.Linear) and not isinstance(blocks_only.proj_in, TwinLinear)
    assert (blocks_only(x) - model_of(base, tunes[1])(x)).abs().max() > 1e-3  # the shared projection differs


def test_bad_inputs_are_one_line_errors():
    base, tunes = family()
    with pytest.raises(AlloyError, match="rank 0"):
        twin_merging(base, tunes, router=fixed_router(torch.ones(K) / K), rank=0)
    with pytest.raises(AlloyError, match="inputs for 2 tasks, 3 fine-tunes"):
        twin_merging(base, tunes, [[task_inputs(0)], [task_inputs(1)]])
    with pytest.raises(AlloyError, match="give inputs"):
        twin_merging(base, tunes)
    with pytest.raises(AlloyError, match="labels must lie"):
        train_router(torch.zeros(4, 3), torch.tensor([0, 1, 2, 5]), 3)


def test_a_transformers_model_with_padding_routes_each_input_and_reloads_from_its_folder(tmp_path):
    base, tunes = bert_family()

    def batch(k: int, seed: int) -> dict:  # task 0 reads tokens 1-24, task 1 tokens 25-49; ragged, padded with 0
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1 + 24 * k, 25 + 25 * k, (6, 7), generator=g)
        mask = torch.ones(6, 7, dtype=torch.long)
        mask[::2, 4:] = 0
        return {"input_ids": ids * mask, "attention_mask": mask}

    routed = twin_merging(base, tunes, [[batch(0, 1), batch(0, 2)], [batch(1, 1), batch(1, 2)]], rank=4, steps=100)
    x = batch(1, 9)
    with torch.no_grad():
        y = routed(**x).last_hidden_state
    assert (routed.twin_last_weights.argmax(-1) == 1).all()
    # the router read the shared model's output averaged over the unmasked tokens only
    with torch.no_grad():
        ref = model_of(base, shared_by_hand(base, tunes))(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(routed.twin_last_weights, routed.twin_router((ref * m).sum(1) / m.sum(1)), atol=1e-5, rtol=1e-4)
    loaded = load_routed_model(save_routed(routed, tmp_path / "bert", host_config=base.config))
    assert type(loaded).__name__ == "BertModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state, y, rtol=0, atol=0)


def test_with_rank_equals_the_model_built_at_that_rank():
    from alloykit.moe.twin import with_rank

    base, tunes = family(6)
    router = fixed_router(torch.tensor([0.2, 0.5, 0.3]))
    full = twin_merging(base, tunes, router=router, rank=24)
    x = torch.cat([task_inputs(k, 4, seed=3) for k in range(K)])
    cut = with_rank(full, 5)
    torch.testing.assert_close(cut(x), twin_merging(base, tunes, router=copy.deepcopy(router), rank=5)(x), atol=1e-6, rtol=1e-6)
    assert cut.alloykit_routing["settings"]["rank"] == 5 and full.alloykit_routing["settings"]["rank"] == 24
    assert not torch.equal(cut(x), full(x))
