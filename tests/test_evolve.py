"""``alloykit search evolve``: CMA-ES over recipes on a toy task whose optimum is known.

The toy of ``test_search.py``: a tiny BERT whose task is the sign of one pooled coordinate
above its median (labels from the base itself, so the base is 100% right); fine-tune ``e1x4`` shifts that
coordinate by 0.5, about 3 standard deviations of it (the more of it, the worse), ``e2`` moves another coordinate (invisible to
the head). A task file (JSONL + the fine-tunes' heads) makes the task readable by Ray
actors in other processes. A search must find a small weight for ``e1x4``, be repeatable for
its seed, resume after a kill to the same evaluations, and write a recipe whose merge is the
candidate it scored, bit for bit. (On Ray workers: ``test_distributed.py``, on its cluster.)
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

pytest.importorskip("cmaes")

from alloykit.cli.main import main  # noqa: E402
from alloykit.testing.helpers import read_state  # noqa: E402
from lm_fixtures import (ROWS, alloykit_cache, base_and_tune, smol_tokenizer, tiny_causal_lm,  # noqa: E402,F401 (fixtures)
                         write_rolling_task)
from test_search import LN_BIAS, toy_base  # noqa: E402

CLI = [sys.executable, "-m", "alloykit.cli.main"]
TOY = "evolve_toy"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("evolve")
    base, texts, s = toy_base(root, seed=1, draws=600)
    m = float(s.median())  # the head's threshold: half the texts each side
    labelled = [{"text": t, "label": "pos" if v > m else "neg"} for t, v in zip(texts, s.tolist()) if abs(v - m) > 1e-3]
    rows = [r for r in labelled if r["label"] == "pos"][:60] + [r for r in labelled if r["label"] == "neg"][:60]
    assert len(rows) == 120  # balanced: a shift that makes every answer "pos" scores 0.5
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = {f"{TOY}.weight": torch.zeros(2, 16), f"{TOY}.bias": torch.zeros(2)}
    head[f"{TOY}.weight"][0, 0], head[f"{TOY}.weight"][1, 0] = -1.0, 1.0  # labels sorted: neg = 0, pos = 1
    head[f"{TOY}.bias"][0], head[f"{TOY}.bias"][1] = m, -m  # "pos" iff s > m
    save_file(head, root / "heads.safetensors")
    (root / "toy.yaml").write_text(f"name: {TOY}\ndata: {{validation: val.jsonl}}\nhead: heads.safetensors\n"
                                   "labels: [neg, pos]\nmetric: accuracy\n")
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    for name, (coord, shift) in {"e1x4": (0, 0.5), "e2": (1, 1.0)}.items():
        ft = dict(sd)
        ft[LN_BIAS] = sd[LN_BIAS].clone()
        ft[LN_BIAS][coord] += shift
        (root / name).mkdir()
        save_file(ft, root / name / "model.safetensors")
        (root / name / "config.json").write_text((root / "base" / "config.json").read_text())
    return root


def config(root, **extra) -> str:
    body = {"base_model": "base", "models": ["e1x4", "e2"], "tasks": ["toy.yaml"], "methods": ["task_arithmetic", "dare_ties"],
            "layer_groups": 2, "max_evals": 12, "population": 4, "seed": 3, "weight_range": [0.0, 1.0], **extra}
    path = root / f"evolve-{abs(hash(json.dumps(extra, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def rows(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in csv.DictReader(f)]


def test_search_finds_the_harmless_merge_and_is_repeatable(toy, tmp_path, capsys):
    cfg = config(toy)
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "a.yaml"), "-q"]) == 0
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "b.yaml"), "-q"]) == 0
    a = rows(tmp_path / "a.evaluations.csv")
    assert len(a) == 12 and a == rows(tmp_path / "b.evaluations.csv")  # same seed: same candidates, same scores
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()
    assert (tmp_path / "a.fitness.png").stat().st_size > 1000
    best = max(float(r["score"]) for r in a)
    # task arithmetic at mergekit-evolve's starting point (every weight 0.5) shifts the coordinate by 0.25
    from alloykit.distributed.evolve import Fitness, load_config

    fit = Fitness(load_config(cfg)[0])
    ta = {"merge_method": "task_arithmetic", "base_model": fit.config.base_model, "dtype": "float32",
          "models": [{"model": m, "parameters": {"weight": 0.5}} for m in fit.config.models]}
    assert best > fit.evaluate(ta)["score"] + 0.05
    assert best >= 0.9


def test_best_recipe_merges_to_the_scored_candidate(toy, tmp_path):
    from alloykit.distributed.evolve import Fitness, load_config

    cfg = config(toy)
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "best.yaml"), "-q"]) == 0
    text = (tmp_path / "best.yaml").read_text()
    assert "best: evaluation" in text and "data: " in text
    assert main(["merge", str(tmp_path / "best.yaml"), str(tmp_path / "merged"), "-q"]) == 0
    merged = read_state(tmp_path / "merged")
    fit = Fitness(load_config(cfg)[0])
    candidate = fit.merged(yaml.safe_load(text))
    assert set(merged) == set(candidate)
    assert all(torch.equal(merged[n], candidate[n]) for n in merged)
    best = max(rows(tmp_path / "best.evaluations.csv"), key=lambda r: float(r["score"]))
    assert fit.evaluate(yaml.safe_load(text))["score"] == float(best["score"])


def test_killed_search_resumes_to_the_same_evaluations(toy, tmp_path):
    cfg = config(toy)
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "ref.yaml"), "-q"]) == 0
    env = {**os.environ, "ALLOYKIT_FAULT_KILL_AT": "evolve-generation-saved"}
    r = subprocess.run(CLI + ["search", "evolve", cfg, "--out", str(tmp_path / "k.yaml"), "-q"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert len(rows(tmp_path / "k.evaluations.csv")) == 4 and not (tmp_path / "k.yaml").exists()
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "k.yaml"), "-q"]) == 2  # a state exists: --resume
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "k.yaml"), "-q", "--resume"]) == 0
    assert rows(tmp_path / "k.evaluations.csv") == rows(tmp_path / "ref.evaluations.csv")
    assert (tmp_path / "k.yaml").read_text() == (tmp_path / "ref.yaml").read_text()


def test_bad_config_one_line(toy, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(toy / "base"), "models": [str(toy / "e2")], "tasks": ["x.yaml"],
                                    "methods": ["no_such_method"]}))
    assert main(["search", "evolve", str(path), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_method" in err[0]


def test_genome_decodes_by_hand():
    from alloykit.distributed.genome import EvolveConfig, Genome

    c = EvolveConfig(base_model="b", models=["m1", "m2"], tasks=["t"], methods=["task_arithmetic", "ties", "dare_ties"],
                     layer_groups=2, normalize="search", weight_range=(-1.0, 1.0), density_range=(0.2, 1.0))
    g = Genome(c)
    assert g.dim == 2 * 2 * 2 + 1 + 1  # weights and densities per model and group, method, normalize
    x = [0.0, 0.25, 0.5, 1.0, 0.0, 0.5, 1.0, 0.75, 0.7, 0.4]
    cand = g.decode(x)
    assert cand.weights == [[-1.0, -0.5], [0.0, 1.0]]
    assert cand.densities == [[0.2, pytest.approx(0.6)], [1.0, pytest.approx(0.8)]]
    assert cand.method == "dare_ties" and cand.normalize is False  # floor(0.7 * 3) = 2; 0.4 < 0.5
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    body = g.recipe(cand, "b", ["m1", "m2"], names, n_layers=4)
    w = {e.get("filter"): e["value"] for e in body["models"][1]["parameters"]["weight"]}
    # layers 0-1 are group 0, layers 2-3 group 1; tensors outside the layers take group 0 (mergekit's rule)
    assert w == {"model.layers.0.mlp.up_proj.weight": 0.0, "model.layers.3.mlp.up_proj.weight": 1.0,
                 "model.embed_tokens.weight": 0.0, None: 0.0}
    assert body["merge_method"] == "dare_ties" and body["parameters"] == {"normalize": False} and body["seed"] == 0


# -- lm-evaluation-harness fitness ------------------------------------------------------------
CHOICE, ROLLING = "alloykit_evolve_choice", "alloykit_evolve_rolling"


@pytest.fixture(scope="module")
def causal(tmp_path_factory, smol_tokenizer):
    """A tiny Llama base and two noisy 'fine-tunes' (SmolLM2's tokenizer); two local harness tasks over one
    local JSONL file: multiple choice (acc) and the prompts' rolling log-likelihood (bits per byte)."""
    pytest.importorskip("lm_eval")
    from alloykit.eval.lm_harness import write_choice_task

    root = tmp_path_factory.mktemp("evolve-lm")
    base, _ = base_and_tune(root, smol_tokenizer, seeds=(21, 22), noise=0.3)
    tiny_causal_lm(root / "ft2", smol_tokenizer, seed=23, like=base, noise=0.3)
    write_choice_task(root / "tasks", CHOICE, ROWS)
    write_rolling_task(root / "tasks", ROLLING, root / "tasks" / f"{CHOICE}.jsonl")
    return root


def lm_config(root, lm_eval=None, **extra) -> str:
    lm_eval = lm_eval or {"tasks": [CHOICE, {"name": ROLLING, "metric": "bits_per_byte"}], "include_path": "tasks"}
    body = {"base_model": "base", "models": ["ft", "ft2"], "lm_eval": lm_eval, "max_evals": 4, "population": 4,
            "seed": 1, "weight_range": [0.0, 1.5], **extra}
    path = root / f"evolve-{abs(hash(json.dumps([lm_eval, extra], sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.fixture(scope="module")
def lm_search(causal):
    """The lm-eval search, serially in this process: its output folder."""
    out = causal / "serial"
    out.mkdir()
    assert main(["search", "evolve", lm_config(causal), "--out", str(out / "best.yaml"), "-q"]) == 0
    return out


@pytest.mark.slow
def test_lm_eval_fitness_is_what_alloykit_eval_gives_the_merged_best(causal, lm_search, tmp_path):
    evals = rows(lm_search / "best.evaluations.csv")
    assert len(evals) == 4 and (lm_search / "best.fitness.png").stat().st_size > 1000
    assert len({r["score"] for r in evals}) == 4  # bits per byte tells every candidate apart
    text = (lm_search / "best.yaml").read_text()
    assert f"lm-evaluation-harness task {ROLLING}" in text and "best: evaluation" in text
    best = max(evals, key=lambda r: float(r["score"]))
    # the independent path: the recipe merged on disk, scored by `alloykit eval --lm-eval` from the folder
    assert main(["merge", str(lm_search / "best.yaml"), str(tmp_path / "merged"), "-q"]) == 0
    assert main(["eval", str(tmp_path / "merged"), "--lm-eval", CHOICE, ROLLING, "--include-path", str(causal / "tasks"),
                 "--output", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())["results"]
    acc, bpb = res[CHOICE]["acc"], res[ROLLING]["bits_per_byte"]
    assert float(best[f"task:{CHOICE}"]) == pytest.approx(acc, abs=1e-6)
    assert float(best[f"task:{ROLLING}"]) == pytest.approx(bpb, abs=1e-6)
    assert float(best["score"]) == pytest.approx((acc - bpb) / 2, abs=1e-6)  # bits per byte: lower is better


@pytest.mark.slow
def test_quiet_lm_eval_search_on_ray_prints_nothing_and_scores_as_serially(causal, lm_search, tmp_path):
    """-q on a local Ray cluster the command starts (a subprocess): no progress, no 'ray cluster:' line, no
    Ray token warning, no harness output; the actors' evaluations are the serial search's."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run(CLI + ["search", "evolve", lm_config(causal), "--out", str(tmp_path / "q.yaml"), "-q",
                              "--workers", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (r.stdout, r.stderr) == ("", "")
    assert rows(tmp_path / "q.evaluations.csv") == rows(lm_search / "best.evaluations.csv")


def test_lm_eval_bad_configs_one_line(causal, tmp_path, capsys):
    def one_line(cfg) -> str:
        assert main(["search", "evolve", cfg, "--out", str(tmp_path / "o.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    msg = one_line(lm_config(causal, {"tasks": ["alloykit_evolve_choise"], "include_path": "tasks"}))
    assert "did you mean 'alloykit_evolve_choice'" in msg and f"the tasks in lm_eval include_path: {CHOICE}, {ROLLING}" in msg
    assert "no such folder" in one_line(lm_config(causal, {"tasks": [CHOICE], "include_path": "nowhere"}))
    assert "not both" in one_line(lm_config(causal, tasks=["toy.yaml"]))
    msg = one_line(lm_config(causal, {"tasks": [CHOICE], "include_path": "tasks", "metric": "f1"}))
    assert "metric 'f1' is not reported for task 'alloykit_evolve_choice' (its metrics: acc, acc_norm)" in msg
    assert not (tmp_path / "o.yaml").exists()
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from alloykit.cli.main import main\n"
            f"sys.exit(main(['search', 'evolve', {lm_config(causal)!r}, '--out', {str(tmp_path / 'p.yaml')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pip install 'alloykit[lm-eval]'" in r.stderr
