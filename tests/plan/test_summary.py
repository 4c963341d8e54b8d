"""What `megalong plan` says about the layouts it did not propose: kinds, families, closest."""

import functools

from megalong.model.presets import preset_config
from megalong.plan.hardware import gpu_spec
from megalong.plan.memory import GB
from megalong.plan.planner import PlanRequest, check_layout, evaluate, plan
from megalong.plan.summary import closest_to_fitting, family_outcomes, not_shown

LLAMA3_8B = preset_config("llama3-8b")


@functools.cache
def _mixed_result():
    """A plan with layouts of every kind: 2 x 8 A100 at 64K, bf16 and fp8 (A100 has no FP8)."""
    return plan(PlanRequest(model=LLAMA3_8B, seq_length=65536, global_batch=64, nodes=2, gpus_per_node=8,
                            gpu=gpu_spec("a100"), precisions=("bf16", "fp8")))


def test_each_rejection_has_the_kind_its_layout_earns():
    result = _mixed_result()
    request, best = result.request, result.best.time.total_s
    usable = request.gpu.memory_gb * GB * (1 - request.memory_headroom)
    assert {r.kind for r in result.rejections} == {"invalid", "too_large", "slower"}
    for rejection in result.rejections:
        invalid = check_layout(rejection.layout, request)
        if rejection.kind == "invalid":
            assert invalid is not None
            continue
        assert invalid is None
        candidate = evaluate(rejection.layout, request)
        if rejection.kind == "too_large":
            assert candidate.memory.total > usable
        else:
            assert candidate.memory.total <= usable and candidate.time.total_s >= best


def test_one_line_per_family_best_outcome_first():
    result = _mixed_result()
    rejected = not_shown(result, top=3)
    assert {c.layout for c in result.candidates[:3]}.isdisjoint(r.layout for r in rejected)
    outcomes = family_outcomes(rejected)
    families = {r.layout.family() for r in rejected}
    assert sorted(o.family for o in outcomes) == sorted(families)
    order = {"slower": 0, "too_large": 1, "invalid": 2}
    assert [order[o.kind] for o in outcomes] == sorted(order[o.kind] for o in outcomes)
    slower_times = [o.example.step_time_s for o in outcomes if o.kind == "slower"]
    assert slower_times == sorted(slower_times) and len(slower_times) > 1
    for outcome in outcomes:
        members = [r for r in rejected if r.layout.family() == outcome.family]
        kinds = {r.kind for r in members}
        assert outcome.example in members and outcome.example.kind == outcome.kind
        if outcome.kind == "slower":
            assert outcome.example.step_time_s == min(r.step_time_s for r in members if r.kind == "slower")
            assert "fits, but slower" in outcome.describe()
        elif outcome.kind == "too_large":
            assert "slower" not in kinds
            assert outcome.example.memory.total == min(r.memory.total for r in members if r.kind == "too_large")
        else:
            assert kinds == {"invalid"}
            assert outcome.describe() == f"{outcome.family}: {outcome.example.reason}"


def test_closest_layouts_when_nothing_fits():
    result = plan(PlanRequest(model=LLAMA3_8B, seq_length=524288, global_batch=16, nodes=1, gpus_per_node=8,
                              gpu=gpu_spec("h100"), loss_chunk_tokens=None))
    assert not result.candidates
    closest = closest_to_fitting(result, 3)
    smallest = sorted(r.memory.total for r in result.rejections if r.kind == "too_large")[:3]
    assert len(closest) == 3 and [r.memory.total for r in closest] == smallest
