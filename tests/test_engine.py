"""The streaming engine: plan from headers, bounded execution, sharded output."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import alloykit
from alloykit.errors import PlanError, RecipeError
from alloykit.io.checkpoint import Checkpoint


def load_folder(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def linear_recipe(tunes, weights, **extra):
    return {"merge_method": "linear", "models": [{"model": str(t), "parameters": {"weight": w}} for t, w in zip(tunes, weights)], **extra}


def test_streaming_sharded_merge_equals_in_memory(family, tmp_path):
    _, tunes = family
    out = alloykit.merge(linear_recipe(tunes, [1.0, 2.0, 3.0]), tmp_path / "out", max_shard_size=50_000, progress=False)
    merged = load_folder(out)
    sds = [load_folder(t) for t in tunes]
    assert set(merged) == set(sds[0])
    for name, v in merged.items():
        ref = (1 * sds[0][name] + 2 * sds[1][name] + 3 * sds[2][name]) / 6
        torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-7)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in merged.values())
    assert not list(tmp_path.glob(".*alloykit-tmp"))


def test_output_loads_in_transformers_with_same_logits(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, tunes = family
    out = alloykit.merge(linear_recipe(tunes[:2], [0.3, 0.7]), tmp_path / "out", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    # the same merge done by hand, in memory
    a = transformers.AutoModelForCausalLM.from_pretrained(tunes[0]).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tunes[1]).state_dict()
    manual = transformers.AutoModelForCausalLM.from_pretrained(tunes[0])
    manual.load_state_dict({k: (0.3 * a[k] + 0.7 * b[k]) / 1.0 for k in a})
    ids = torch.tensor([[1, 5, 9, 33, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, manual(ids).logits, rtol=1e-5, atol=1e-5)
    for f in ("config.json", "generation_config.json", "alloykit_recipe.yaml", "alloykit_manifest.json", "README.md"):
        assert (out / f).is_file(), f


def test_merge_state_dicts_on_modules():
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    merged = alloykit.merge_state_dicts([m1, m2], "linear", model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(merged["weight"], (m1.weight + 3 * m2.weight).detach() / 4)
    torch.testing.assert_close(merged["bias"], (m1.bias + 3 * m2.bias).detach() / 4)


def test_plan_reads_headers_only(family, monkeypatch):
    _, tunes = family

    def boom(self, name):
        raise AssertionError("plan read a tensor")

    monkeypatch.setattr(Checkpoint, "read", boom)
    plan = alloykit.plan_recipe(linear_recipe(tunes, [1, 1, 1]))
    assert len(plan.jobs) == 4 * 9 + 3
    plan.close()


def test_gradient_parameters_follow_layers(family, tmp_path):
    _, tunes = family
    r = linear_recipe(tunes[:2], [[1.0, 0.0], [0.0, 1.0]], parameters={"normalize": True})
    plan = alloykit.plan_recipe(r)
    by_name = {j.name: j for j in plan.jobs}
    w = lambda n: [m.weight for m in by_name[n].model_params]  # noqa: E731
    assert w("model.layers.0.mlp.up_proj.weight") == [1.0, 0.0]
    assert w("model.layers.3.mlp.up_proj.weight") == [0.0, 1.0]
    assert w("model.layers.1.mlp.up_proj.weight") == pytest.approx([2 / 3, 1 / 3])
    assert w("lm_head.weight") == [1.0, 0.0]  # outside the layers: t = 0
    plan.close()


def test_thread_count_does_not_change_bytes(family, tmp_path):
    _, tunes = family
    r = linear_recipe(tunes, [0.2, 0.5, 0.3])
    outs = [alloykit.merge(r, tmp_path / f"o{n}", threads=n, progress=False, max_shard_size=40_000) for n in (1, 3)]
    files = sorted(p.name for p in outs[0].glob("*.safetensors"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()


def test_missing_tensor_and_shape_mismatch_leave_no_output(family, tmp_path):
    from alloykit.testing.fixtures import LlamaShape, write_llama

    _, tunes = family
    odd = write_llama(tmp_path / "odd", LlamaShape(hidden=32, intermediate=64))
    with pytest.raises(PlanError, match=r"tensor 'model.embed_tokens.weight': model '.*odd' has shape \[256, 32\]"):
        alloykit.merge(linear_recipe([tunes[0], odd], [1, 1]), tmp_path / "out")
    short = write_llama(tmp_path / "short", LlamaShape(layers=2))
    with pytest.raises(PlanError, match="missing from model"):
        alloykit.merge(linear_recipe([tunes[0], short], [1, 1]), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_zero_total_weight_is_refused(family, tmp_path):
    _, tunes = family
    with pytest.raises(RecipeError, match="sum"):
        alloykit.merge(linear_recipe(tunes[:2], [1.0, -1.0]), tmp_path / "out")


def test_passthrough_slices_stack_layers(family, tmp_path):
    _, tunes = family
    r = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tunes[0]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(tunes[1]), "layer_range": [1, 4]}]},
        ],
    }
    out = alloykit.merge(r, tmp_path / "out", progress=False)
    merged = load_folder(out)
    a, b = load_folder(tunes[0]), load_folder(tunes[1])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    torch.testing.assert_close(merged["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.5.self_attn.q_proj.weight"], b["model.layers.3.self_attn.q_proj.weight"])
    torch.testing.assert_close(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    torch.testing.assert_close(merged["lm_head.weight"], b["lm_head.weight"])


def test_tokenizer_and_dtype(family, tmp_path):
    _, tunes = family
    src = tmp_path / "withtok"
    shutil.copytree(tunes[0], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    r = linear_recipe([src, tunes[1]], [1, 1], dtype="bfloat16")
    out = alloykit.merge(r, tmp_path / "out", progress=False)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 7}'
    assert {v.dtype for v in load_folder(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "model_stock"])
def test_optimised_executor_path_equals_the_reference(method, family):
    """The executor lends its stack (deltas computed in place) and runs jobs on threads;
    the reference path is the method's pure function on fresh tensors, one job at a time."""
    from alloykit.methods.registry import MergeInput
    from alloykit.plan.executor import compute_job, mergekit_dtype
    from alloykit.plan.planner import tensor_seed

    base, tunes = family
    params = {"weight": 0.7} if method in ("linear", "task_arithmetic") else {"weight": 0.7, "density": 0.6}
    if method == "model_stock":
        params = {}
    r = {"merge_method": method, "models": [{"model": str(t), "parameters": params} for t in tunes]}
    if method != "linear":
        r["base_model"] = str(base)
    plan = alloykit.plan_recipe(r, seed=3)
    for job in plan.jobs[:6]:
        fast = compute_job(plan, job, torch.device("cpu"))
        stack = torch.stack([plan.checkpoints[s.model].read(s.tensor).float() for s in job.sources])
        b = plan.checkpoints[job.base.model].read(job.base.tensor).float() if job.base else None
        gen = torch.Generator().manual_seed(tensor_seed(3, job.name)) if plan.method.randomized else None
        ref = plan.method.fn(MergeInput(job.name, stack, b, job.params, job.model_params, gen, role=job.role,
                                        compute_dtype=mergekit_dtype(plan, job))).to(job.out_dtype)
        if method in ("model_stock", "dare_ties", "della"):
            # their fast paths sum in another order (model_stock's inner products, the L1 norms of
            # DARE/DELLA's rescaling): equal within 1e-6 relative, as tests/test_fast_paths.py holds
            assert float((fast - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), job.name
        else:
            assert torch.equal(fast, ref), job.name
    plan.close()


def test_integer_buffer_only_in_the_base_is_copied(family, tmp_path):
    """Old checkpoints save BERT's position_ids; fine-tunes saved by newer transformers do not."""
    import shutil

    from safetensors.torch import save_file

    base, tunes = family
    b2 = tmp_path / "base"
    shutil.copytree(base, b2)
    save_file({"embeddings.position_ids": torch.arange(8).unsqueeze(0)}, str(b2 / "extra.safetensors"))
    import json as _json

    idx = b2 / "model.safetensors.index.json"
    data = _json.loads(idx.read_text())
    data["weight_map"]["embeddings.position_ids"] = "extra.safetensors"
    idx.write_text(_json.dumps(data))
    r = {"merge_method": "task_arithmetic", "base_model": str(b2), "models": [{"model": str(t), "parameters": {"weight": 0.5}} for t in tunes]}
    out = load_folder(alloykit.merge(r, tmp_path / "out", progress=False))
    assert torch.equal(out["embeddings.position_ids"], torch.arange(8).unsqueeze(0))
