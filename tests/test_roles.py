"""Tensor roles (alloykit.roles) against the module structure of real transformers models.

The oracle is the model itself, built by transformers from a tiny config: a parameter of
an ``nn.Embedding`` is an embedding, of ``get_output_embeddings()`` the output head, of a
``*Norm`` module a norm; its layer is the index of the block (of the model's stack of
blocks) that holds it; a linear layer inside a block is an attention projection when an
ancestor is an attention module, else an MLP projection (or a router).
"""

from dataclasses import replace

import pytest
import torch

import alloykit
from alloykit.methods.registry import MergeInput, get_method
from alloykit.plan.executor import run_jobs
from alloykit.plan.planner import make_plan
from alloykit.roles import Kind, num_layers, role_of, split_layer, tied_embeddings

transformers = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64)
GQA = dict(SMALL, num_key_value_heads=1)


def _configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(**GQA),
        "mistral": t.MistralConfig(**GQA),
        "qwen2": t.Qwen2Config(**GQA),
        "gemma": t.GemmaConfig(**GQA, head_dim=8),
        "phi3": t.Phi3Config(**SMALL, pad_token_id=0),
        "mixtral": t.MixtralConfig(**GQA, num_local_experts=2),
        "gpt2": t.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32),
        "gpt_neox": t.GPTNeoXConfig(**SMALL),
        "opt": t.OPTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, ffn_dim=32, vocab_size=64,
                           word_embed_proj_dim=16, max_position_embeddings=32),
        "bert": t.BertConfig(**SMALL, max_position_embeddings=32),
    }


def _model(family, cfg):
    with torch.device("meta"):  # structure only, no memory
        if family == "bert":
            return transformers.BertForMaskedLM(cfg)
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _blocks(model):
    """The model's stack of repeated blocks: its largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _expected(model, name):
    """(kind predicate, layer) of parameter ``name`` from the module structure."""
    path = name.split(".")
    chain = [model]
    for part in path[:-1]:
        chain.append(getattr(chain[-1], part))
    module = chain[-1]
    blocks = _blocks(model)
    layer = next((i for i, b in enumerate(blocks) if any(b is m for m in chain)), None)
    names = [type(m).__name__ for m in chain]
    if isinstance(module, torch.nn.Embedding):
        return (lambda r: r.is_embedding), layer
    if module is model.get_output_embeddings():
        return (lambda r: r.kind is Kind.OUTPUT_HEAD), layer
    if "Norm" in type(module).__name__:
        return (lambda r: r.kind is Kind.NORM), layer
    if layer is not None and (isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))
                              or "Experts" in type(module).__name__):
        if any("Attention" in n or n.endswith("SelfOutput") for n in names[-3:]):
            return (lambda r: r.is_attention), layer
        if path[-2] in ("gate", "router"):
            return (lambda r: r.kind is Kind.ROUTER), layer
        return (lambda r: r.is_mlp), layer
    return (lambda r: True), layer


@pytest.mark.parametrize("family", list(_configs()))
def test_roles_match_the_module_structure(family):
    cfg = _configs()[family]
    model = _model(family, cfg)
    config = cfg.to_dict()
    names = list(model.state_dict())
    for name in names:
        role = role_of(name, config)
        ok, layer = _expected(model, name)
        assert ok(role), f"{family}: {name} got {role}"
        assert role.layer == layer, f"{family}: {name} layer {role.layer}, the module says {layer}"
        assert role.section == ("layer" if layer is not None else role.section)
    assert num_layers(config, names) == 2
    assert num_layers(None, names) == 2  # counted from the names when there is no config
    # every projection inside a block is named: none falls back to 'other'
    linear_in_blocks = [n for n in names if role_of(n).layer is not None and n.endswith(".weight")
                        and "norm" not in n.lower() and "ln_" not in n]
    assert all(role_of(n).kind is not Kind.OTHER for n in linear_in_blocks), \
        [n for n in linear_in_blocks if role_of(n).kind is Kind.OTHER]


def test_specific_projections_and_sections():
    r = role_of
    assert r("model.layers.3.self_attn.q_proj.weight").kind is Kind.ATTN_Q
    assert r("model.layers.3.self_attn.k_proj.bias").kind is Kind.ATTN_K
    assert r("model.layers.3.self_attn.o_proj.weight").kind is Kind.ATTN_O
    assert r("model.layers.3.mlp.gate_proj.weight").kind is Kind.MLP_GATE
    assert r("model.layers.3.mlp.down_proj.weight").kind is Kind.MLP_DOWN
    assert r("transformer.h.1.attn.c_attn.weight").kind is Kind.ATTN_QKV
    assert r("transformer.h.1.mlp.c_proj.weight").kind is Kind.MLP_DOWN
    assert r("encoder.layer.0.attention.self.value.weight").kind is Kind.ATTN_V
    assert r("encoder.layer.0.intermediate.dense.weight").kind is Kind.MLP_UP
    assert r("encoder.layer.0.output.dense.weight").kind is Kind.MLP_DOWN
    assert r("transformer.wpe.weight").kind is Kind.POSITION_EMBEDDING
    assert r("embeddings.token_type_embeddings.weight").kind is Kind.TOKEN_TYPE_EMBEDDING
    assert r("score.weight").kind is Kind.CLASSIFIER and r("bert.pooler.dense.weight").kind is Kind.POOLER
    # where tensors outside the blocks sit: the slices planner and RegMean++ read it
    assert [r(n).section for n in ("embeddings.LayerNorm.weight", "vision_model.pre_layrnorm.weight",
                                   "model.norm.weight", "cls.predictions.transform.dense.weight",
                                   "model.rotary_emb.inv_freq")] == ["pre", "pre", "post", "post", "unknown"]
    # the outermost stack counts (T5: block 0, not its sub-layer 1)
    assert split_layer("encoder.block.0.layer.1.DenseReluDense.wi.weight") == ("encoder.block.", 0, "layer.1.DenseReluDense.wi.weight")
    assert split_layer("lm_head.weight") is None


def test_tied_heads_come_from_config_json():
    head = "lm_head.weight"
    assert role_of(head, {"model_type": "gpt2"}).tied  # transformers' default for GPT-2
    assert not role_of(head, {"model_type": "llama"}).tied
    assert role_of(head, {"model_type": "llama", "tie_word_embeddings": True}).tied
    assert tied_embeddings(None) is None and not role_of(head).tied
    assert role_of(head, {"model_type": "gemma3", "text_config": {"tie_word_embeddings": False}}).tied is False


def test_the_planner_tags_jobs_and_methods_see_the_role(family):
    _, tunes = family
    plan = make_plan({"merge_method": "linear", "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tunes]})
    try:
        roles = {j.name: j.role for j in plan.jobs}
    finally:
        plan.close()
    assert roles["model.embed_tokens.weight"].kind is Kind.EMBEDDING
    assert roles["lm_head.weight"].kind is Kind.OUTPUT_HEAD and not roles["lm_head.weight"].tied  # config says untied
    assert roles["model.layers.2.self_attn.v_proj.weight"].kind is Kind.ATTN_V
    assert roles["model.layers.2.self_attn.v_proj.weight"].layer == 2
    seen = {}
    spec = get_method("linear")

    def spy(x: MergeInput):
        seen[x.name] = x.role
        return spec.fn(x)

    plan = make_plan({"merge_method": "linear", "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tunes]},
                     method=replace(spec, fn=spy))
    try:
        run_jobs(plan, lambda n, t: None, threads=2, progress=False)
    finally:
        plan.close()
    assert seen == roles


def test_slices_take_the_head_end_from_the_last_slice(tmp_path):
    """BERT's masked-LM head (cls.predictions.*) sits after the blocks: a slices recipe takes it
    from the last slice's model, with the final norm and pooler (it came from the first before roles)."""
    cfg = transformers.BertConfig(**SMALL, max_position_embeddings=32)
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / f"m{i}")
        folders.append(tmp_path / f"m{i}")
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(folders[0]), "layer_range": [0, 1]}]},
                                                        {"sources": [{"model": str(folders[1]), "layer_range": [1, 2]}]}]}
    plan = alloykit.plan_recipe(recipe)
    try:
        src = {j.name: plan.labels[j.sources[0].model] for j in plan.jobs}
    finally:
        plan.close()
    assert src["cls.predictions.transform.dense.weight"] == str(folders[1])
    assert src["cls.predictions.bias"] == str(folders[1])
    assert src["bert.embeddings.word_embeddings.weight"] == str(folders[0])
    assert src["bert.embeddings.LayerNorm.weight"] == str(folders[0])


def test_subspace_methods_average_every_embedding_table_and_the_head():
    """TSV-M decomposes the blocks' linear maps; position embeddings (GPT-2's wpe, too) and the
    output head are averaged: base + alpha * mean task vector."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(12, 8, generator=g) for n in ("transformer.wpe.weight", "lm_head.weight",
                                                         "transformer.h.0.attn.c_attn.weight")}
    tunes = [{n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    out = alloykit.merge_state_dicts(tunes, "tsv_m", base=base, parameters={"alpha": 0.7})
    for name in ("transformer.wpe.weight", "lm_head.weight"):
        want = base[name] + 0.7 * torch.stack([t[name] - base[name] for t in tunes]).mean(0)
        torch.testing.assert_close(out[name], want)
    fallback = base["transformer.h.0.attn.c_attn.weight"] + 0.7 * torch.stack(
        [t["transformer.h.0.attn.c_attn.weight"] - base["transformer.h.0.attn.c_attn.weight"] for t in tunes]).mean(0)
    assert not torch.allclose(out["transformer.h.0.attn.c_attn.weight"], fallback)  # the matrix is decomposed
