"""alloykit plan: a summary by default (jobs grouped, layer ranges, bytes), every tensor with --all or --json."""

import json

from alloykit.cli.main import main
from alloykit.cli.plan_summary import ranges


def plan(capsys, recipe, *extra):
    assert main(["plan", str(recipe), *extra]) == 0
    return capsys.readouterr().out


def test_ranges():
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert ranges([3]) == "3" and ranges([]) == ""


def test_default_is_a_summary_grouped_by_method_and_parameters(family, tmp_path, capsys):
    base, tunes = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                      f"  - model: {tunes[0]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                      f"  - model: {tunes[1]}\n    parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.3}}, {{value: 0.7}}]}}\n")
    out = plan(capsys, recipe)
    lines = out.splitlines()
    assert len(lines) < 15, out  # 39 tensors
    assert lines[0].startswith("method: ties") and "tensors: 39" in lines[0] and "read: " in lines[0] and "write: " in lines[0]
    assert f"[0] {base} (base)" in out
    # two groups: the MLP projections (density 0.3 for the second model), everything else (0.7)
    groups = [line for line in lines if line.startswith("  ties(")]
    assert len(groups) == 2 and "density=[0.5, 0.7]" in groups[0] and "density=[0.5, 0.3]" in groups[1]
    assert "weight=[1, 0.5]" in groups[0]
    details = [line for line in lines if "tensors:" in line and "writes" in line]
    assert details[0].startswith("      27 tensors: layers 0-3; model.embed_tokens.weight, model.norm.weight, lm_head.weight")
    assert details[1].startswith("      12 tensors: layers 0-3; writes")
    every = plan(capsys, recipe, "--all").splitlines()
    assert len([line for line in every if " <- ties(" in line]) == 39
    assert len(json.loads(plan(capsys, recipe, "--json"))["jobs"]) == 39


def test_layer_gradients_collapse_to_ranges_and_slices_show_their_layers(family, tmp_path, capsys, monkeypatch):
    from alloykit.cli import plan_summary

    base, tunes = family
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - model: {tunes[0]}\n    parameters: {{weight: [0.2, 0.9]}}\n"
                      f"  - model: {tunes[1]}\n    parameters: {{weight: [1.0, 0.0, 1.0]}}\n")
    out = plan(capsys, recipe)
    groups = [line for line in out.splitlines() if line.startswith("  task_arithmetic(")]
    assert len(groups) == 4 and "weight=[0.2, 1]" in groups[0] and "weight=[0.9, 1]" in groups[3], out  # one per layer
    assert "      9 tensors: layer 2; writes" in out
    monkeypatch.setattr(plan_summary, "MAX_GROUPS", 3)  # a deeper model: one line, each parameter's range
    out = plan(capsys, recipe)
    groups = [line for line in out.splitlines() if line.startswith("  task_arithmetic(")]
    assert len(groups) == 1 and "weight=[0.2..0.9, 0.3333..1]" in groups[0], out
    assert "parameters vary by tensor" in out
    recipe = tmp_path / "s.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tunes[0]}, layer_range: [0, 2]}}]\n"
                      f"  - sources: [{{model: {tunes[1]}, layer_range: [1, 4]}}]\n")
    out = plan(capsys, recipe)
    assert "layers 0-1; model.embed_tokens.weight" in out and "layers 2-4; model.norm.weight, lm_head.weight" in out
