"""``alloykit eval MODEL --lm-eval TASK`` on a merged tiny Llama (SmolLM2's real tokenizer) with a
local harness task, checked against an independent log-likelihood computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lm_fixtures import ROWS, alloykit_cache, base_and_tune, choice_logliks, merge_recipe, smol_tokenizer  # noqa: F401 (fixture)

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from alloykit.cli.main import main  # noqa: E402
from alloykit.eval.lm_harness import write_choice_task  # noqa: E402

def independent_scores(folder, rows):
    """acc and acc_norm from first principles: transformers' fp32 logits; acc_norm divides each
    choice's log-likelihood by its length in bytes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    acc = acc_norm = 0
    for r, scores in zip(rows, choice_logliks(model, tok, rows)):
        norm = [s / len(c.encode()) for s, c in zip(scores, r["choices"])]
        acc += max(range(len(scores)), key=scores.__getitem__) == r["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == r["label"]
    return acc / len(rows), acc_norm / len(rows)


@pytest.mark.slow
def test_lm_eval_local_task_on_merged_model(tmp_path, smol_tokenizer, capsys):
    base, ft = base_and_tune(tmp_path, smol_tokenizer, seeds=(11, 12), noise=0.5)
    merged = merge_recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{weight: 0.8}}\n"
                                    f"models:\n  - model: {ft}\n", "merged")
    tasks = tmp_path / "tasks"
    write_choice_task(tasks, "alloykit_test_choice", ROWS)
    out = tmp_path / "res.json"
    code = main(["eval", str(merged), "--lm-eval", "alloykit_test_choice", "--include-path", str(tasks),
                 "--output", str(out), "--batch-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["results"]["alloykit_test_choice"]
    want_acc, want_norm = independent_scores(merged, ROWS)
    assert res["acc"] == pytest.approx(want_acc, abs=1e-9)
    assert res["acc_norm"] == pytest.approx(want_norm, abs=1e-9)
    assert f"acc {want_acc:.4f}" in printed
    # the same model as an F32 GGUF file (a folder holding one): loaded through transformers' GGUF reader
    from alloykit.io.gguf_write import write_gguf

    (tmp_path / "g").mkdir()
    write_gguf(merged, tmp_path / "g" / "merged.f32.gguf", "f32")
    assert main(["eval", str(tmp_path / "g"), "--lm-eval", "alloykit_test_choice", "--include-path", str(tasks),
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["alloykit_test_choice"]["acc"] == pytest.approx(want_acc, abs=1e-9)


def test_unknown_task_and_bad_model_give_one_line(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    write_choice_task(tasks, "alloykit_test_choice", ROWS[:2])
    (tmp_path / "m").mkdir()
    code = main(["eval", str(tmp_path / "m"), "--lm-eval", "alloykit_test_choice", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no config.json" in err
    code = main(["eval", str(tmp_path / "nowhere"), "--lm-eval", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no file or folder" in err


def test_task_name_typo_suggests_the_local_task(tmp_path):
    from alloykit.errors import AlloyError
    from alloykit.eval.lm_harness import task_manager

    tasks = tmp_path / "tasks"
    write_choice_task(tasks, "alloykit_test_choice", ROWS[:2])
    with pytest.raises(AlloyError, match="did you mean 'alloykit_test_choice'"):
        task_manager(["alloykit_test_choise"], [str(tasks)])


def test_missing_harness_names_the_extra():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from alloykit.cli.main import main\n"
            "sys.exit(main(['eval', '.', '--lm-eval', 'x']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'alloykit[lm-eval]'" in r.stderr
