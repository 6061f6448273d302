"""LoraHub: weights learned from a few examples favour the adapter trained on their task;
the search is deterministic for a seed; the emitted recipe composes the adapter as PEFT loads it."""

import json

import pytest
import torch
import yaml

from alloykit.lora.hub import Example, compose, lorahub_search
from alloykit.testing.fixtures import write_llama
from alloykit.testing.helpers import run_cli as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

def make_examples(targets):
    g = torch.Generator().manual_seed(5)
    return [Example(torch.randint(10, 100, (6,), generator=g).tolist(), list(targets)) for _ in range(4)]


def loss_of(model, examples):
    total = 0.0
    for e in examples:
        ids = torch.tensor([e.input_ids + e.output_ids])
        labels = torch.tensor([[-100] * len(e.input_ids) + e.output_ids])
        total += float(model(input_ids=ids, labels=labels).loss)
    return total / len(examples)


def train_adapter(base, examples, out, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        loss = sum(pm(input_ids=torch.tensor([e.input_ids + e.output_ids]),
                      labels=torch.tensor([[-100] * len(e.input_ids) + e.output_ids])).loss for e in examples)
        loss.backward()
        opt.step()
    pm.save_pretrained(out)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = write_llama(root / "base")
    task = make_examples([7, 8, 9])
    train_adapter(base, task, root / "helpful", 1)
    train_adapter(base, make_examples([200, 201, 202]), root / "other", 2)
    return root, base, task


def test_helpful_adapter_gets_the_larger_weight_and_search_is_deterministic(hub):
    root, base, task = hub
    adapters = [root / "other", root / "helpful"]
    result = lorahub_search(base, adapters, task, steps=30, seed=0)
    w_other, w_helpful = result.weights
    # the composed update is w^2-homogeneous: (sum -w B)(sum -w A) is the same, so only |w| and
    # relative signs matter; the reported sign has a nonnegative sum
    assert w_helpful > 0.5 and w_helpful > abs(w_other) + 0.3
    for seed in (1, 2):
        ws = lorahub_search(base, adapters, task, steps=30, seed=seed).weights
        assert sum(ws) >= 0 and ws[1] > abs(ws[0]) + 0.3, ws
    assert result.loss < result.base_loss - 1.0
    # the objective is the loss plus 0.05 * mean |w|
    assert result.objective == pytest.approx(result.loss + 0.05 * (abs(w_other) + abs(w_helpful)) / 2, rel=1e-9)
    again = lorahub_search(base, adapters, task, steps=30, seed=0)
    assert again.weights == result.weights and again.history == result.history
    assert all(-1.5 <= w <= 1.5 for ws, _ in result.history for w in ws)


def test_composition_is_the_weighted_sum_of_both_factors():
    g = torch.Generator().manual_seed(0)
    f1 = (torch.randn(5, 2, generator=g), torch.randn(2, 3, generator=g))
    f2 = (torch.randn(5, 2, generator=g), torch.randn(2, 3, generator=g))
    left, right = compose([f1, f2], [0.5, -1.0], "w")
    want = (0.5 * f1[0] - f2[0]) @ (0.5 * f1[1] - f2[1])  # cross terms included, as in the paper
    torch.testing.assert_close(left @ right, want)


def test_cli_recipe_runs_through_merge_lora_and_matches_peft(hub, tmp_path, capsys):
    root, base, task = hub
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps({"input_ids": e.input_ids, "output_ids": e.output_ids}) + "\n" for e in task))
    code, out, err = cli(capsys, "search", "lorahub", "--base", base, "--adapters", root / "other", root / "helpful",
                         "--data", data, "--steps", 20, "--seed", 3, "--out", tmp_path / "hub.yaml")
    assert code == 0, err
    assert "lorahub: weights [" in out
    doc = yaml.safe_load((tmp_path / "hub.yaml").read_text())
    assert doc["merge_lora"]["method"] == "lorahub" and len(doc["merge_lora"]["weights"]) == 2
    code, out, err = cli(capsys, "merge-lora", "--recipe", tmp_path / "hub.yaml", tmp_path / "composed")
    assert code == 0 and "(exact)" in out, err
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "composed")
    with torch.no_grad():
        assert loss_of(model, task) == pytest.approx(doc["lorahub"]["loss"], abs=2e-5)
    # weights rounded to 6 digits in the recipe: the loss PEFT sees is the one the search reported


def test_lorahub_errors(hub, tmp_path, capsys):
    root, base, task = hub
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    code, out, err = cli(capsys, "search", "lorahub", "--base", base, "--adapters", root / "helpful", "--data", bad, "--out", tmp_path / "x.yaml")
    assert code == 2 and "needs 'input' and 'output'" in err
    code, out, err = cli(capsys, "merge-lora", "--recipe", tmp_path / "x.yaml", tmp_path / "o")
    assert code == 2 and "does not exist" in err


def test_text_examples_are_tokenized_with_the_base_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from alloykit.lora.hub import load_examples

    vocab = {"[UNK]": 0, "two": 1, "plus": 2, "three": 3, "is": 4, "five": 5}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "two plus three is", "output": "five"}) + "\n\n"
                    + json.dumps({"input_ids": [1, 2], "output_ids": [3]}) + "\n")
    examples = load_examples(data, tmp_path / "tok")
    assert [(e.input_ids, e.output_ids) for e in examples] == [([1, 2, 3, 4], [5]), ([1, 2], [3])]
