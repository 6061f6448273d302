"""The causal-LM track's harness end to end, CI-sized (benchmarks/quality_lm, preset ci).

A tiny random Llama with SmolLM2's tokenizer, written as an F32 GGUF, is the base; two real
skills (WordNet definitions, chatterbot Q&A), a few fine-tuning steps, the merges through the
CLI. The numbers mean nothing at this size, so the asserts check what must hold exactly:
the scorer against an independent computation on transformers' own GGUF loading, merges
that are the same model by construction scoring the same, and the harness task files the
track writes giving the track's own accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_fixtures import alloykit_cache, choice_logliks, smollm2_gguf  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "quality_lm" / "run.py"


def _need_data():
    from alloykit.eval.data import WORDNET_DIR

    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet is not installed (make data: apt-get install -y wordnet-base)")
    pytest.importorskip("chatterbot_corpus", reason="pip install chatterbot-corpus")
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    pytest.importorskip("lm_eval")
    smollm2_gguf()


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    _need_data()
    tmp = tmp_path_factory.mktemp("quality_lm")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(RUN), "--preset", "ci", "--cache", str(tmp / "cache"), "--json", str(tmp / "results.json"),
           "--md", str(tmp / "results-lm.md"), "--harness-tasks", str(tmp / "harness")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return tmp, json.loads((tmp / "results.json").read_text())


def _test_rows(tmp: Path, task: str) -> list[dict]:
    folder = next((tmp / "cache" / "data").glob(f"{task}-*"))
    return [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ci_preset_end_to_end(ci_run):
    tmp, res = ci_run
    import transformers

    rows = res["rows"]
    expected = {"base", "finetuned:definitions", "finetuned:qa", "multi-task", "linear", "task_arithmetic", "ties",
                "regmean", "fisher", "adamerging_task", "lora:definitions", "lora:qa", "lora task_arithmetic",
                "merge-lora cat"}
    assert set(rows) == expected
    # 1. the base row: the scorer against transformers' own loading of the GGUF base
    gguf = next((tmp / "cache" / "tiny-base").glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for task in res["tasks"]:
        test = _test_rows(tmp, task)
        scores = choice_logliks(model, tok, test)
        got = rows["base"]["tasks"][task]
        np.testing.assert_allclose(got["nll"], [-s[r["label"]] for s, r in zip(scores, test)], atol=2e-4)
        assert got["correct"] == [int(int(np.argmax(s)) == r["label"]) for s, r in zip(scores, test)]
    # 2. one model two ways: two tasks averaged = task arithmetic at lambda 0.5; merge-lora's exact
    #    'cat' at weight 0.5 = task arithmetic of the base+adapter inputs at lambda 0.5
    for a, b in (("linear", "task_arithmetic"), ("merge-lora cat", "lora task_arithmetic")):
        assert rows[b]["scale"] == 0.5
        for task in res["tasks"]:
            np.testing.assert_allclose(rows[a]["tasks"][task]["nll"], rows[b]["tasks"][task]["nll"], atol=2e-3)
    # 3. the report
    md = (tmp / "results-lm.md").read_text()
    assert "### Reference models" in md and "### Merges of the full fine-tunes" in md and "| regmean |" in md
    assert (tmp / "results-lm.png").stat().st_size > 1000 and (tmp / "results-lm-tasks.png").stat().st_size > 1000


@pytest.mark.slow
def test_harness_tasks_reproduce_the_track_accuracy(ci_run):
    """The skills written as local lm-evaluation-harness tasks: `alloykit eval --lm-eval` on a merged
    folder gives the track's own accuracy on the same examples (both fp32 here)."""
    tmp, res = ci_run
    merged = next((tmp / "cache" / "merges").glob("full-task_arithmetic-*"))
    out = tmp / "harness.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "alloykit.cli.main", "eval", str(merged), "--lm-eval", "alloykit_lm_definitions",
                        "alloykit_lm_qa", "--include-path", str(tmp / "harness"), "--output", str(out)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    harness = json.loads(out.read_text())["results"]
    for task in res["tasks"]:
        want = np.mean(res["rows"]["task_arithmetic"]["tasks"][task]["correct"])
        assert harness[f"alloykit_lm_{task}"]["acc"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow
def test_smaller_run_reuses_the_first_examples_of_a_cached_score(ci_run):
    """A run with fewer test examples or skills (the lite preset beside the full one) reads a
    cached row's first examples instead of scoring the model again; a different model is not matched."""
    tmp, res = ci_run
    sys.path.insert(0, str(RUN.parent))
    import run as harness
    from lm_bench import Bench

    p = {**harness.PRESETS["ci"], "n_eval": 5, "tasks": ["qa"]}
    cache = tmp / "cache"
    base = next(cache.glob("base-hf-*"))
    data = {"qa": next((cache / "data").glob("qa-*"))}
    bench = Bench(p, "ci", next((cache / "tiny-base").glob("*.gguf")), base, data, cache, log=lambda *a: None)

    def must_not_score():
        raise AssertionError("scored again instead of reading the cache")

    got = bench.scores(f"base:{base.name}", must_not_score)
    assert list(got) == ["qa"]
    for k in ("correct", "nll", "tokens"):
        np.testing.assert_array_equal(got["qa"][k], np.asarray(res["rows"]["base"]["tasks"]["qa"][k][:5], dtype=got["qa"][k].dtype))
    with pytest.raises(AssertionError, match="scored again"):
        bench.scores("base:some-other-model", must_not_score)


@pytest.mark.slow
def test_a_score_cached_for_fewer_skills_is_not_taken_for_a_run_with_more(ci_run):
    """A score file under the same key but written by a run with fewer skills (the lite preset's three beside
    the full preset's four, same example count) used to end in a KeyError; it is scored again instead."""
    tmp, res = ci_run
    sys.path.insert(0, str(RUN.parent))
    import run as harness
    from lm_bench import SCORER, Bench
    from lm_common import digest

    p = {**harness.PRESETS["ci"], "n_eval": 5}
    cache = tmp / "cache"
    base = next(cache.glob("base-hf-*"))
    data = {t: next((cache / "data").glob(f"{t}-*")) for t in ("definitions", "qa")}
    bench = Bench(p, "ci", next((cache / "tiny-base").glob("*.gguf")), base, data, cache, log=lambda *a: None)
    key = "base:a-model-scored-on-one-skill"
    one = {"correct": [True] * 5, "nll": [1.0] * 5, "tokens": [3] * 5}
    path = cache / "scores" / f"test-{digest(key, SCORER, 5, p['score_bf16'])}.json"
    path.write_text(json.dumps({"key": key, "scorer": SCORER, "bf16": p["score_bf16"], "cost": {}, "tasks": {"qa": one}}))

    def scored_again():
        raise RuntimeError("scored again")

    with pytest.raises(RuntimeError, match="scored again"):
        bench.scores(key, scored_again)
    path.write_text(json.dumps({"key": key, "scorer": SCORER, "bf16": p["score_bf16"], "cost": {},
                                "tasks": {"qa": one, "definitions": one}}))
    assert sorted(bench.scores(key, scored_again)) == ["definitions", "qa"]


@pytest.mark.slow
def test_cached_only_report_reproduces_the_rows_without_merging(ci_run, tmp_path):
    """--cached-only rebuilds the results from the cache alone: the same rows, nothing merged again
    (the kept task_arithmetic folder aside, every merge folder was deleted after scoring)."""
    tmp, res = ci_run
    merges_before = sorted(p.name for p in (tmp / "cache" / "merges").iterdir())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "again.json"
    r = subprocess.run([sys.executable, str(RUN), "--preset", "ci", "--cache", str(tmp / "cache"), "--cached-only", "--json", str(out),
                        "--md", str(tmp_path / "again.md")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["rows"] == res["rows"]
    assert sorted(p.name for p in (tmp / "cache" / "merges").iterdir()) == merges_before
    assert "--cached-only" in again["command"]
