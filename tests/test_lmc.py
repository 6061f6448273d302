"""Linear mode connectivity and REPAIR: barriers against hand-computed cases, REPAIR's
restored statistics against the endpoints', and ``alloykit analyze --lmc`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alloykit.align as A
from alloykit.align import lmc
from alloykit.align.repair import endpoint_targets, measure, producers, repair
from alloykit.cli.main import main
from alloykit.errors import AlloyError

pytest.importorskip("scipy")


def test_barrier_hand_computed():
    # loss: line through (0, 1.0) and (1, 1.4) is 1.2 at 0.5; the path is 2.0 there
    assert lmc.barrier([0, 0.5, 1], [1.0, 2.0, 1.4]) == pytest.approx(0.8)
    # accuracy: line 0.8 at 0.5, path 0.5 -> 0.3 points below
    assert lmc.barrier([0, 0.5, 1], [0.9, 0.5, 0.7], higher_is_better=True) == pytest.approx(0.3)
    # a path below its chord has no barrier (the largest gap is at an endpoint: 0)
    assert lmc.barrier([0, 0.5, 1], [1.0, 0.5, 1.0]) == 0.0
    with pytest.raises(ValueError):
        lmc.barrier([0.1, 1], [1, 1])


class Scalar(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))


def test_path_interpolates_and_measures_a_hand_computed_barrier():
    """L(w) = (w - 1)(3 - w) + 1 from w = 1 to w = 3: endpoints 1, peak 2 at the midpoint."""
    def evaluate(m):
        w = float(m.w.detach())
        return (w - 1) * (3 - w) + 1, 1.0 - abs(w - 2) / 2

    p = lmc.path(Scalar(1.0), Scalar(3.0), evaluate, steps=5)
    assert p["alpha"] == [0, 0.25, 0.5, 0.75, 1.0]
    assert p["loss"] == pytest.approx([1.0, 1.75, 2.0, 1.75, 1.0])
    assert p["loss_barrier"] == pytest.approx(1.0)
    assert p["accuracy"] == pytest.approx([0.5, 0.75, 1.0, 0.75, 0.5])
    assert p["accuracy_barrier"] == pytest.approx(0.0)  # accuracy above its chord everywhere


def test_interpolate_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "ids": torch.tensor([1, 2])}
    b = {"w": torch.tensor([4.0, 6.0]), "ids": torch.tensor([7, 8])}
    out = lmc.interpolate(a, b, 0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0])) and torch.equal(out["ids"], a["ids"])


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, width), nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_repair_restores_per_unit_statistics_to_the_target():
    """Two independently initialised MLPs, aligned and averaged: the midpoint's hidden units
    have collapsed statistics; after REPAIR every unit's mean and standard deviation on the
    calibration data equal the average of the endpoints'."""
    torch.manual_seed(0)
    a, b = MLP().eval(), MLP().eval()
    x = torch.randn(512, 10)
    batches = [x[i:i + 128] for i in range(0, 512, 128)]
    b_aligned = A.align(b, a, example_input=x[:2]).module
    mid = MLP().eval()
    mid.load_state_dict(lmc.interpolate(a.state_dict(), b_aligned.state_dict(), 0.5))
    spec = A.module_spec(a, x[:2])
    names = producers(spec, a)
    assert names == ["fc1", "fc2"]
    targets = endpoint_targets([a, b_aligned], [0.5, 0.5], names, batches)
    before = measure(mid, names, batches)
    assert before["fc2"].std.mean() < 0.9 * targets["fc2"][1].mean()  # variance collapse
    repair(mid, [a, b_aligned], spec, batches)
    after = measure(mid, names, batches)
    for n in names:
        assert torch.allclose(after[n].mean, targets[n][0], atol=1e-5)
        assert torch.allclose(after[n].std, targets[n][1], rtol=1e-5, atol=1e-6)
    # hand check of one unit: the target is the plain average of the endpoints' statistics
    sa, sb = measure(a, ["fc1"], batches)["fc1"], measure(b_aligned, ["fc1"], batches)["fc1"]
    assert float(targets["fc1"][1][3]) == pytest.approx(float(sa.std[3] + sb.std[3]) / 2)


def test_repair_refuses_layers_without_bias():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(AlloyError, match="REPAIR: no layer of this llama model"):
        producers(A.spec_for_module(m, permute_outputs=True), m)


# -- analyze --lmc ------------------------------------------------------------------------------------

WORDS = "alpha beta gamma delta merge align repair path barrier unit head layer".split()


def word_tokenizer():
    """A real (word-level) fast tokenizer over a small vocabulary, saved with each tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """A tiny BERT classifier, a random permutation of it, an unrelated one, labelled .jsonl data."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("lmc")
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    a = transformers.BertForSequenceClassification(cfg).eval()
    spec = A.spec_for_module(a)
    permuted = transformers.BertForSequenceClassification(cfg)
    permuted.load_state_dict(A.apply_permutations(a.state_dict(), spec, spec.random(2)))
    torch.manual_seed(1)
    other = transformers.BertForSequenceClassification(cfg).eval()
    tok = word_tokenizer()
    for name, m in (("a", a), ("b", permuted), ("c", other)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(48):
        n = 3 + i % 5  # texts of different lengths: batches are padded
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[j] for j in idx), "label": i % 2}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root, a, other, tok


def _eval(model, root, tok):
    """Reference evaluation: one text at a time (no padding), mean cross-entropy and accuracy."""
    rows = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    nll = correct = 0.0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["text"], return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0]
            nll -= float(torch.log_softmax(logits, -1)[r["label"]])
            correct += float(logits.argmax() == r["label"])
    return nll / len(rows), correct / len(rows)


def test_analyze_lmc_of_a_permuted_copy(classifiers, tmp_path, capsys):
    """B is A permuted: the aligned path is flat at A's loss, the naive one is not; the report's
    endpoints equal an independent evaluation and its barrier the formula on its own values."""
    root, a, _, tok = classifiers
    out = tmp_path / "report"
    assert main(["analyze", "--lmc", str(root / "a"), str(root / "b"), "--data", str(root / "data.jsonl"),
                 "--steps", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weight_matching" in printed and "wrote" in printed
    report = json.loads((out / "lmc.json").read_text())
    assert (out / "lmc.png").stat().st_size > 1000
    loss_a, acc_a = _eval(a, root, tok)
    naive, aligned = report["paths"]["naive"], report["paths"]["weight_matching"]
    assert naive["loss"][0] == pytest.approx(loss_a, rel=1e-4) and naive["accuracy"][0] == pytest.approx(acc_a)
    assert naive["loss"][-1] == pytest.approx(loss_a, rel=1e-4)  # the same function at both ends
    assert aligned["loss"] == pytest.approx([loss_a] * 5, rel=1e-4)
    assert aligned["loss_barrier"] == pytest.approx(0.0, abs=1e-4)
    assert naive["loss_barrier"] == pytest.approx(lmc.barrier(naive["alpha"], naive["loss"]))
    assert report["moved_fraction"]["weight_matching"] > 0.5


def test_analyze_lmc_with_repair_and_mistakes(classifiers, tmp_path, capsys):
    root, _, _, _ = classifiers
    assert main(["analyze", "--lmc", str(root / "a"), str(root / "c"), "--data", str(root / "data.jsonl"),
                 "--steps", "3", "--repair", "--align", "weight_matching", "activation_matching", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["paths"]) == {"naive", "weight_matching", "weight_matching+repair", "activation_matching",
                                    "activation_matching+repair"}
    ends = {name: (p["loss"][0], p["loss"][-1]) for name, p in report["paths"].items()}
    assert all(v == pytest.approx(ends["naive"], rel=1e-4) for v in ends.values())  # aligned B is B's function
    for argv, text in [
        (["analyze", "--lmc", str(root / "a"), str(root / "c")], "--lmc needs the evaluation data"),
        (["analyze", "--lmc", str(root / "a"), str(root / "c"), "--data", str(root / "data.jsonl"), "--align", "none",
          "--repair"], "--repair rescales aligned paths"),
        (["analyze", "--lmc", str(root / "a"), str(root / "c"), "--data", str(root / "data.jsonl"), "--align", "sinkhorn"],
         "--align sinkhorn"),
        (["analyze"], "give the fine-tuned models and --base"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err


def test_analyze_lmc_of_causal_lms(tmp_path, capsys):
    """Causal LMs on plain text (no tokenizer: UTF-8 bytes): a permuted copy is flat once aligned."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(cfg).eval()
    spec = A.spec_for_module(a)
    b = transformers.LlamaForCausalLM(cfg)
    b.load_state_dict(A.apply_permutations(a.state_dict(), spec, spec.random(1)))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\nmerging models needs aligned units\na path between two minima\n")
    assert main(["analyze", "--lmc", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(text), "--steps", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "causal-lm" and report["examples"] == 3
    ids = torch.tensor([list(b"the cat sat on the mat")])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(a(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
    aligned = report["paths"]["weight_matching"]["loss"]
    assert aligned == pytest.approx([aligned[0]] * 3, rel=1e-5)
    assert report["paths"]["naive"]["loss"][0] == pytest.approx(aligned[0], rel=1e-6)
    one = tmp_path / "one.txt"  # one text: the mean next-token loss is the reference's sum over its 21 predictions
    one.write_text("the cat sat on the mat\n")
    assert main(["analyze", "--lmc", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(one), "--steps", "2",
                 "--align", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["paths"]["naive"]["loss"][0] == pytest.approx(float(ref) / 21, rel=1e-5)
