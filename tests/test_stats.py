"""``alloykit stats collect``: Grams and Fishers checked against hand computations, then
collect -> merge end to end on tiny Llama-shaped and BERT checkpoints."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.cli.main import main
from alloykit.stats.collect import Example, Target, collect, score_causal
from alloykit.testing.fixtures import LlamaShape, write_family

SHAPE = LlamaShape(vocab=64, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SHAPE.config())).eval()


def _examples(lengths=(5, 9, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(0, SHAPE.vocab, (n,), generator=g)) for n in lengths]


def test_gram_is_xtx_of_each_linear_input_over_unpadded_tokens():
    model = _tiny_llama()
    exs = _examples()
    stats, meta = collect(Target(model, "tiny", score_causal), exs, "gram", batch_size=2, log=lambda s: None)
    grams = stats["gram"]
    # by hand, one example at a time (no padding): q_proj's input is layer 0's input norm of the
    # embeddings; lm_head's is the last hidden state (after the final norm)
    with torch.no_grad():
        x_q = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(e.ids[None]))[0] for e in exs])
        x_head = torch.cat([model(input_ids=e.ids[None], output_hidden_states=True).hidden_states[-1][0] for e in exs])
    n = sum(len(e.ids) for e in exs)
    assert meta["gram"]["tokens"]["model.layers.0.self_attn.q_proj.weight"] == n == x_q.shape[0]
    assert torch.allclose(grams["model.layers.0.self_attn.q_proj.weight"], x_q.T @ x_q / n, atol=1e-5)
    assert torch.allclose(grams["lm_head.weight"], x_head.T @ x_head / n, atol=1e-4)
    assert grams["model.layers.1.mlp.down_proj.weight"].shape == (SHAPE.intermediate, SHAPE.intermediate)
    assert "model.embed_tokens.weight" not in grams  # embeddings are no linear layers


def test_empirical_fisher_is_the_mean_of_per_example_squared_gradients():
    model = _tiny_llama(1)
    exs = _examples((4, 6, 5), seed=1)
    stats, meta = collect(Target(model, "tiny", score_causal), exs, "fisher", log=lambda s: None)
    f = stats["fisher"]
    params = dict(model.named_parameters())
    names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for e in exs:  # log p(sequence) = -(sum of next-token cross-entropies), one example at a time
        logits = model(input_ids=e.ids[None]).logits[0, :-1]
        ll = -torch.nn.functional.cross_entropy(logits, e.ids[1:], reduction="sum")
        grads = torch.autograd.grad(ll, [params[n] for n in names])
        for n, gr in zip(names, grads):
            expected[n] += gr.square() / len(exs)
    for n in names:
        assert torch.allclose(f[n], expected[n], rtol=1e-4, atol=1e-9), n
    assert meta["fisher"]["variant"] == "empirical" and meta["samples"] == 3
    assert set(f) == set(params)


def test_sampled_fisher_draws_labels_from_a_seeded_generator():
    model = _tiny_llama(2)
    exs = _examples((6, 6), seed=2)
    t = Target(model, "tiny", score_causal)
    a = collect(t, exs, "fisher_sampled", seed=5, log=lambda s: None)[0]["fisher"]
    b = collect(t, exs, "fisher_sampled", seed=5, log=lambda s: None)[0]["fisher"]
    c = collect(t, exs, "fisher_sampled", seed=6, log=lambda s: None)[0]["fisher"]
    emp = collect(t, exs, "fisher", log=lambda s: None)[0]["fisher"]
    n = "lm_head.weight"
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n]) and not torch.allclose(a[n], emp[n])


def _run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr()


def test_collect_then_merge_regmean_on_llama_checkpoints(tmp_path, capsys):
    _, (ft1, ft2) = write_family(tmp_path, 2, SHAPE)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"calibration text number {i}, a few words"}) for i in range(6)))
    recipe = tmp_path / "r.yaml"
    head = "merge_method: regmean\nparameters:\n  alpha: 1.0\nmodels:\n"
    recipe.write_text(head + f"  - model: {ft1}\n  - model: {ft2}\n")
    rc, out = _run(["merge", str(recipe), str(tmp_path / "out")], capsys)
    assert rc == 2 and f"alloykit stats collect {ft1} --out {ft1}.stats --kind gram --data CALIBRATION.txt" in out.err
    assert len(out.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    for ft in (ft1, ft2):
        rc, out = _run(["stats", "collect", str(ft), "--out", f"{ft}.stats", "--kind", "gram", "--data", str(calib),
                        "--samples", "4", "--batch-size", "3"], capsys)
        assert rc == 0, out.err
        assert "4/4 samples" in out.err
    meta = json.loads((tmp_path / "ft1.stats" / "alloykit_stats.json").read_text())
    assert meta["samples"] == 4 and meta["kinds"] == ["gram"] and meta["model"] == str(ft1)
    recipe.write_text(head + f"  - model: {ft1}\n    stats: {ft1}.stats\n  - model: {ft2}\n    stats: {ft2}.stats\n")
    rc, out = _run(["merge", str(recipe), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0, out.err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    g = [load_file(tmp_path / f"ft{i}.stats" / "gram.safetensors")[name].double() for i in (1, 2)]
    w = [load_file(ft / "model.safetensors")[name].double() for ft in (ft1, ft2)]
    expected = torch.linalg.solve(g[0] + g[1], g[0] @ w[0].T + g[1] @ w[1].T).T
    assert torch.allclose(merged[name].double(), expected, atol=1e-4)
    norm = "model.layers.0.input_layernorm.weight"  # no Gram: the average
    assert torch.allclose(merged[norm], (load_file(ft1 / "model.safetensors")[norm] + load_file(ft2 / "model.safetensors")[norm]) / 2)


def test_collect_fisher_and_gram_on_a_tiny_bert_fine_tune(tmp_path, capsys):
    """The benchmark's layout (encoder/ + heads.safetensors) on a tiny BERT; the task's real data."""
    from alloykit.eval import DataMissingError, get_task

    try:
        get_task("wordnet_pos").load()
        from alloykit.eval.model import load_tokenizer

        vocab = load_tokenizer().vocab_size
    except (DataMissingError, ImportError) as err:
        pytest.skip(str(err))
    from transformers import BertConfig, BertModel

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        enc = BertModel(BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=64))
        ft = tmp_path / f"ft{seed}"
        enc.save_pretrained(ft / "encoder")
        save_file({"wordnet_pos.weight": torch.randn(4, 8), "wordnet_pos.bias": torch.zeros(4)}, ft / "heads.safetensors")
        rc, out = _run(["stats", "collect", str(ft / "encoder"), "--out", str(ft / "stats"), "--task", "wordnet_pos",
                        "--kind", "all", "--samples", "6"], capsys)
        assert rc == 0, out.err
        folders.append(ft)
    f = load_file(folders[0] / "stats" / "fisher.safetensors")
    gr = load_file(folders[0] / "stats" / "gram.safetensors")
    assert f["encoder.layer.0.attention.self.query.weight"].shape == (8, 8) and (f["encoder.layer.0.output.dense.weight"] > 0).any()
    assert gr["encoder.layer.0.output.dense.weight"].shape == (16, 16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: regmean\nmodels:\n" + "".join(
        f"  - model: {ft / 'encoder'}\n    stats: {ft / 'stats'}\n    calibration: wordnet_pos\n" for ft in folders))
    rc, out = _run(["merge", str(recipe), str(tmp_path / "merged"), "-q"], capsys)
    assert rc == 0, out.err
    name = "encoder.layer.0.output.dense.weight"
    grams = [load_file(ft / "stats" / "gram.safetensors")[name].double() for ft in folders]
    grams = [0.9 * g + 0.1 * torch.diag(torch.diag(g)) for g in grams]  # default alpha 0.9
    ws = [load_file(ft / "encoder" / "model.safetensors")[name].double() for ft in folders]
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, ws))).T
    assert torch.allclose(load_file(tmp_path / "merged" / "model.safetensors")[name].double(), expected, atol=1e-4)
    recipe.write_text(recipe.read_text().replace("regmean", "fisher"))
    rc, out = _run(["merge", str(recipe), str(tmp_path / "merged_f"), "-q"], capsys)
    assert rc == 0, out.err


def test_regmean_plus_plus_grams_come_from_the_merged_earlier_layers(tmp_path, capsys):
    """collect-merged then merge: block 1's Grams are those of inputs that went through the
    merged embeddings and block 0 (recomputed by hand), and the merge applies RegMean to them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, (ft1, ft2) = write_family(tmp_path, 2, SHAPE)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"line {i} of calibration text" for i in range(5)))
    rc, out = _run(["stats", "collect-merged", str(ft1), str(ft2), "--out", f"{ft1}.pp", f"{ft2}.pp", "--data", str(calib),
                    "--samples", "3", "--alpha", "1.0"], capsys)
    assert rc == 0, out.err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: regmean_plus_plus\nparameters:\n  alpha: 1.0\nmodels:\n"
                      f"  - model: {ft1}\n    stats: {ft1}.pp\n  - model: {ft2}\n    stats: {ft2}.pp\n")
    rc, out = _run(["merge", str(recipe), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0, out.err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    texts = calib.read_text().splitlines()[:3]
    grams, ws = [], []
    for ft in (ft1, ft2):
        own = load_file(ft / "model.safetensors")
        sd = {k: (merged[k] if k.startswith(("model.embed_tokens", "model.layers.0.")) else v) for k, v in own.items()}
        model = LlamaForCausalLM(LlamaConfig(**SHAPE.config())).eval()
        model.load_state_dict(sd)
        with torch.no_grad():
            xs = [model.model.layers[1].input_layernorm(
                model(input_ids=torch.tensor([[b % SHAPE.vocab for b in t.encode()]]), output_hidden_states=True).hidden_states[1])[0] for t in texts]
        x = torch.cat(xs).double()
        g = x.T @ x / x.shape[0]
        stored = load_file(tmp_path / f"{ft.name}.pp" / "gram.safetensors")[name].double()
        assert torch.allclose(stored, g, rtol=1e-4, atol=1e-6)
        grams.append(g)
        ws.append(own[name].double())
    expected = torch.linalg.solve(grams[0] + grams[1], grams[0] @ ws[0].T + grams[1] @ ws[1].T).T
    assert torch.allclose(merged[name].double(), expected, atol=1e-4)
    meta = json.loads((tmp_path / "ft1.pp" / "alloykit_stats.json").read_text())
    assert meta["gram"]["inputs"] == "merged" and meta["gram"]["alpha"] == 1.0


def test_evaluate_reports_the_mean_next_token_loss(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, (ft1,) = write_family(tmp_path, 1, SHAPE)
    data = tmp_path / "held.txt"
    data.write_text("first held-out text\n\nsecond, longer held-out text\n")
    rc, out = _run(["stats", "evaluate", str(ft1), "--data", str(data), "--json"], capsys)
    assert rc == 0, out.err
    r = json.loads(out.out)["results"][0]
    model = AutoModelForCausalLM.from_pretrained(str(ft1), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in ("first held-out text", "second, longer held-out text"):
            ids = torch.tensor([b % SHAPE.vocab for b in text.encode()])
            logits = model(input_ids=ids[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            n += len(ids) - 1
    assert r["n"] == 2 and r["tokens"] == n and r["metric"] == "perplexity"
    assert r["loss"] == pytest.approx(nll / n, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() and r["data"]["used"] == 2
    rc, out = _run(["stats", "evaluate", str(tmp_path / "missing"), "--data", str(data)], capsys)
    assert rc == 2 and "no such file or folder" in out.err
