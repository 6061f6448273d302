"""Routed merges (SMILE, WEMoE): the routing, the formulas, the folder format, the cost.

References are hand-built: fine-tunes of a toy model whose updates read disjoint input
subspaces (task k changes the weights only on the coordinates of block k, and task k's
inputs live there), so the right expert for every input is known, SMILE's projection norm
||V_k^T x|| is ||x|| for the right expert and 0 for the others, and at full rank the routed
layer computes the fine-tune's own weights exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alloykit.errors import AlloyError, CheckpointError
from alloykit.moe.routed import (EnsembleLinear, SmileLinear, load_routed_model, overhead, parameter_count, read_record,
                                 routed_layers, save_routed)
from alloykit.moe.routing import smile, smile_layer, train_routers, wemoe
from alloykit.search.adamerging import softmax_entropy

D, H, K, BLOCK = 24, 32, 3, 8  # width, MLP width, tasks, coordinates per task


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(D, H), "down_proj": nn.Linear(H, D)})

    def forward(self, x):
        return x + self.mlp["down_proj"](F.gelu(self.mlp["up_proj"](x)))


class Toy(nn.Module):
    """Blocks named as a transformer's (``layers.N.mlp.up_proj``), so the roles find their MLPs."""

    def __init__(self, layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.norm(x)


def subspace(k: int) -> slice:
    return slice(k * BLOCK, (k + 1) * BLOCK)


def toy_family(seed: int = 0, layers: int = 1, scale: float = 1.0) -> tuple[Toy, list[dict]]:
    """A base and K fine-tunes: fine-tune k changes the up projections' columns of block k (and their
    bias) and the final norm."""
    torch.manual_seed(seed)
    base = Toy(layers).eval()
    tunes = []
    for k in range(K):
        sd = {n: t.clone() for n, t in base.state_dict().items()}
        g = torch.Generator().manual_seed(100 + k)
        for i in range(layers):
            w = sd[f"layers.{i}.mlp.up_proj.weight"]
            w[:, subspace(k)] += scale * torch.randn(H, BLOCK, generator=g)
            sd[f"layers.{i}.mlp.up_proj.bias"] += 0.1 * torch.randn(H, generator=g)
        sd["norm.weight"] = sd["norm.weight"] + 0.05 * torch.randn(D, generator=g)
        tunes.append(sd)
    return base, tunes


def separated_family(seed: int = 0) -> tuple[Toy, list[dict], list[nn.Linear]]:
    """A base whose MLP computes nothing (up and down zero) and K fine-tunes with MLPs of their own:
    fine-tune k reads every input (non-negative weights into hidden block k) and writes s(x) a_k
    (a_k a unit direction of subspace k, s >= 0 on non-negative inputs). Head k scores +-<f, a_k>
    after the final LayerNorm: on task k's (non-negative) inputs its predictions grow more
    confident the more of expert k the model applies (a negative coefficient gains little: gelu of
    a negative is bounded), and less confident the more of any other expert, whose a_j takes a
    share of the normalised features: interference, as between real fine-tunes."""
    torch.manual_seed(seed)
    base = Toy(1).eval()
    with torch.no_grad():
        for p in base.layers[0].mlp.parameters():
            p.zero_()
    hb = H // K
    tunes, heads = [], []
    for k in range(K):
        g = torch.Generator().manual_seed(200 + k)
        sd = {n: t.clone() for n, t in base.state_dict().items()}
        sd["layers.0.mlp.up_proj.weight"][k * hb:(k + 1) * hb] = torch.rand(hb, D, generator=g)
        a = torch.zeros(D)
        a[subspace(k)] = torch.randn(BLOCK, generator=g)
        a /= a.norm()
        sd["layers.0.mlp.down_proj.weight"][:, k * hb:(k + 1) * hb] = a[:, None] * torch.rand(1, hb, generator=g)
        tunes.append(sd)
        head = nn.Linear(D, 2)
        with torch.no_grad():
            head.weight.copy_(torch.stack([a, -a]) * 0.25)
            head.bias.zero_()
        heads.append(head)
    return base, tunes, heads


def inputs(k: int, n: int = 64, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 10 + k)
    x = noise * torch.randn(n, 5, D, generator=g)  # 5 tokens per input
    x[..., subspace(k)] += torch.randn(n, 5, BLOCK, generator=g)
    return x


def finetuned_model(base: Toy, sd: dict) -> Toy:
    import copy

    m = copy.deepcopy(base)
    m.load_state_dict(sd)
    return m.eval()


# -- SMILE -------------------------------------------------------------------------------------------
def test_smile_layer_follows_the_papers_equations():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    experts = [(base.weight + torch.randn(7, 10), base.bias + torch.randn(7)) for _ in range(3)]
    layer = smile_layer(base, experts, rank=4, gate_rank=2, top_k=2)
    x = torch.randn(5, 10)
    # by hand: SVD of each update, projection norms, softmax, top-2 renormalised, rank-4 experts
    svds = [torch.linalg.svd(w - base.weight, full_matrices=False) for w, _ in experts]
    norms = torch.stack([(x @ vh[:2].T).norm(dim=-1) for _, _, vh in svds], dim=-1)
    p = torch.softmax(norms, -1)
    top, idx = p.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    want = base(x)
    for row in range(5):
        for j in range(2):
            k = int(idx[row, j])
            u, s, vh = svds[k]
            delta = (u[:, :4] * s[:4]) @ vh[:4]
            want[row] += top[row, j] * (delta @ x[row] + experts[k][1] - base.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_smile_routes_each_task_to_its_expert_and_reproduces_the_fine_tune_at_full_rank():
    base, tunes = toy_family()
    routed = smile(base, tunes, rank=D, gate_rank=BLOCK, top_k=1)
    layer = routed.layers[0].mlp["up_proj"]
    assert isinstance(layer, SmileLinear) and not isinstance(routed.layers[0].mlp["down_proj"], SmileLinear)  # unchanged
    for k in range(K):
        x = inputs(k)
        chosen = layer.routing(x.reshape(-1, D)).argmax(-1)
        assert bool((chosen == k).all()), (k, chosen.unique())
        # the rest (the final norm) is the average of the fine-tunes: compare before it
        mine = routed.layers[0](x)
        theirs = finetuned_model(base, tunes[k]).layers[0](x)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_smile_on_noisy_separable_data_still_routes_to_the_right_expert():
    base, tunes = toy_family(layers=2)
    routed = smile(base, tunes, rank=4, gate_rank=4, top_k=1)
    for k in range(K):
        x = inputs(k, noise=0.1, seed=3)
        chosen = routed.layers[0].mlp["up_proj"].routing(x.reshape(-1, D)).argmax(-1)
        assert float((chosen == k).float().mean()) > 0.97


def test_a_routed_model_with_one_expert_is_the_fine_tune():
    base, tunes = toy_family(layers=2)
    x = torch.randn(4, 5, D)
    want = finetuned_model(base, tunes[1])(x)
    torch.testing.assert_close(smile(base, [tunes[1]], rank=D, gate_rank=2)(x), want, rtol=1e-5, atol=1e-5)
    # WEMoE: task arithmetic at lambda 1 and a router that outputs 1: the fine-tune again
    routed = wemoe(base, [tunes[1]], init_lambda=1.0, steps=0)
    for m in routed_layers(routed).values():
        if m.router is not None:
            m.router.net[-1].weight.data.zero_()
    torch.testing.assert_close(routed(x), want, rtol=1e-5, atol=1e-5)


# -- WEMoE -------------------------------------------------------------------------------------------
class ToyEntropy:
    """Unlabelled inputs of each task and fixed per-task heads: AdaMerging's objective protocol."""

    def __init__(self, model, heads, data):
        self.model, self.heads, self.data, self.names = model, heads, data, [f"task{k}" for k in range(K)]

    def size(self, task):
        return len(self.data[task])

    def entropy(self, params, task, idx):
        out = torch.func.functional_call(self.model, params, (self.data[task][idx],))
        return softmax_entropy(self.heads[task](out.mean(1))).mean()


def test_wemoe_block_computes_base_plus_weighted_task_vectors():
    base, tunes, _ = separated_family()
    tunes = [{n: t + 0.01 * torch.randn_like(t) if ".mlp." in n else t for n, t in sd.items()} for sd in tunes]
    routed = wemoe(base, tunes, init_lambda=0.3, steps=0)
    up = routed.layers[0].mlp["up_proj"]
    down = routed.layers[0].mlp["down_proj"]
    assert isinstance(up, EnsembleLinear) and up.router is not None
    assert isinstance(down, EnsembleLinear) and down.router is None and down.leader is up
    x = torch.randn(2, 5, D)
    r = up.router(x)  # [2, 5, K]
    for layer, name, inp in ((up, "up_proj", x), (down, "down_proj", torch.randn(2, 5, H))):
        w0, b0 = base.layers[0].mlp[name].weight, base.layers[0].mlp[name].bias
        w = w0 + torch.einsum("btk,koi->btoi", r, torch.stack([t[f"layers.0.mlp.{name}.weight"] - w0 for t in tunes]))
        b = b0 + r @ torch.stack([t[f"layers.0.mlp.{name}.bias"] - b0 for t in tunes])
        if layer is down:
            up(x)  # the follower reuses the coefficients its block's router just computed
        torch.testing.assert_close(layer(inp), torch.einsum("btoi,bti->bto", w, inp) + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, torch.full_like(r, 0.3), atol=0.05, rtol=0)  # starts as task arithmetic at 0.3


def test_wemoe_routers_learn_from_unlabelled_inputs_to_weight_each_tasks_expert():
    base, tunes, heads = separated_family()
    # each task's unlabelled inputs: non-negative, in its subspace
    data = [inputs(k, n=48, seed=5).abs() for k in range(K)]
    routed = wemoe(base, tunes, init_lambda=0.3, steps=80, lr=1e-2, batch_size=16, seed=0,
                   objective_for=lambda m: ToyEntropy(m, heads, data))
    h = routed.alloykit_routing["settings"]["entropy"]
    assert h["last"] < h["first"] - 0.05
    up = routed.layers[0].mlp["up_proj"]
    for k in range(K):
        held_out = inputs(k, n=32, seed=9).abs()
        with torch.no_grad():
            r = up.router(held_out).mean((0, 1))
        assert int(r.argmax()) == k and float(r[k]) > 0.5, (k, r)


def test_train_routers_refuses_a_model_without_routers():
    base, tunes = toy_family()
    with pytest.raises(AlloyError, match="no router parameters"):
        train_routers(smile(base, tunes), ToyEntropy(base, [], []), steps=1)


# -- folders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["smile", "wemoe"])
def test_save_and_load_a_routed_toy_with_its_skeleton(tmp_path, method):
    base, tunes = toy_family(layers=2)
    tunes = [{n: t + 0.01 * torch.randn_like(t) if "down_proj" in n else t for n, t in sd.items()} for sd in tunes]
    routed = smile(base, tunes, rank=3, gate_rank=2) if method == "smile" else wemoe(base, tunes, steps=0)
    out = save_routed(routed, tmp_path / "r", method=method, experts=["a", "b", "c"])
    record = read_record(out)
    assert record["format"] == "alloykit-routed" and record["method"] == method and record["host"]["kind"] == "module"
    with pytest.raises(AlloyError, match="pass its skeleton"):
        load_routed_model(out)
    loaded = load_routed_model(out, module=Toy(2))
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), routed(x), rtol=0, atol=0)
    if method == "wemoe":
        assert loaded.layers[1].mlp["down_proj"].leader is loaded.layers[1].mlp["up_proj"]
    assert not list(tmp_path.glob(".r*"))  # no working folder left
    assert loaded.alloykit_routing["method"] == method and loaded.alloykit_routing["experts"] == ["a", "b", "c"]
    again = read_record(save_routed(loaded, tmp_path / "again"))  # saved again: the same record
    assert {k: again[k] for k in ("method", "experts", "settings", "layers")} == {k: record[k] for k in ("method", "experts", "settings", "layers")}


def bert_family() -> tuple[nn.Module, list[dict]]:
    """A tiny BertModel (vocabulary 50, width 16, 2 layers) and two fine-tunes: every float tensor moved a little."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg).eval()
    tunes = []
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        tunes.append({n: t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                      for n, t in base.state_dict().items()})
    return base, tunes


def test_a_transformers_host_is_rebuilt_from_the_folder_alone(tmp_path):
    base, tunes = bert_family()
    routed = smile(base, tunes, rank=4, gate_rank=2, targets="blocks")
    kinds = {n.split(".")[-2] + "." + n.split(".")[-1] for n in routed_layers(routed)}
    assert {"self.query", "intermediate.dense", "output.dense"} <= kinds  # attention and MLP linears of the blocks
    out = save_routed(routed, tmp_path / "bert", method="smile", host_config=base.config)
    loaded = load_routed_model(out)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, routed(ids).last_hidden_state, rtol=0, atol=0)
    assert type(loaded).__name__ == "BertModel"


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no routed model folder"):
        load_routed_model(tmp_path)
    base, tunes = toy_family()
    out = save_routed(smile(base, tunes), tmp_path / "r", method="smile")
    record = json.loads((out / "routed.json").read_text())
    record["version"] = 99
    (out / "routed.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_routed_model(out, module=Toy())
    record["version"] = 1
    record["layers"]["layers.0.mlp.up_proj"]["type"] = "pickle"
    (out / "routed.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="type 'pickle'"):
        load_routed_model(out, module=Toy())
    with pytest.raises(AlloyError, match="no routed layer"):
        save_routed(Toy(), tmp_path / "plain", method="smile")


# -- cost --------------------------------------------------------------------------------------------
def test_parameter_and_latency_overhead_are_reported():
    base, tunes = toy_family(layers=2)
    r, g = 4, 2
    routed = smile(base, tunes, rank=r, gate_rank=g)
    per_layer = K * g * D + K * H * r + K * r * D + K * H  # gate, U S, V^T, bias deltas of each up projection
    assert parameter_count(routed) == parameter_count(base) + 2 * per_layer
    x = torch.randn(64, 5, D)
    cost = overhead(routed, base, lambda m: m(x), repeats=2)
    assert cost["parameters"] == pytest.approx(parameter_count(routed) / parameter_count(base))
    assert cost["latency"] > 0 and cost["dense_cpu_s"] > 0
