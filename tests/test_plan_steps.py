"""Planning steps: features complete a plan through the public PlanBuilder, registered by name."""

import pytest

import alloykit
from alloykit.methods import get_method
from alloykit.plan.planner import PlanBuilder
from alloykit.plan.steps import plan_steps, register_plan_step, unregister_plan_step


def _recipe(tunes, method="linear"):
    return {"merge_method": method, "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tunes]}


def test_the_statistics_step_is_registered_by_the_composition_root_and_loads_lazily():
    (stats,) = [s for s in plan_steps() if s.name == "stats"]
    assert stats.applies(get_method("fisher")) and stats.applies(get_method("regmean"))
    assert not stats.applies(get_method("linear"))
    assert stats.function().__module__ == "alloykit.stats.attach"


def test_a_step_sees_the_builder_and_may_add_inputs(family):
    _, tunes = family
    seen = {}

    def step(b: PlanBuilder) -> None:
        seen["jobs"] = len(b.merged_jobs())
        seen["labels"] = list(b.labels)
        seen["method"] = b.spec.name
        extra = b.checkpoint(0)  # the first input, opened once more under another label
        seen["index"] = b.add_checkpoint("side input", extra)

    register_plan_step("probe", step, applies=lambda spec: spec.name == "linear")
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_plan_step("probe", step, applies=lambda spec: True)
        plan = alloykit.plan_recipe(_recipe(tunes))
        plan.close()
        assert seen["method"] == "linear" and seen["jobs"] == len(plan.jobs) and seen["labels"] == [str(t) for t in tunes]
        assert plan.labels[seen["index"]] == "side input"
        seen.clear()
        plan = alloykit.plan_recipe(_recipe(tunes, "task_arithmetic") | {"base_model": str(tunes[0])})
        plan.close()
        assert not seen  # the step does not apply to other methods
    finally:
        unregister_plan_step("probe")
    assert "probe" not in [s.name for s in plan_steps()]
