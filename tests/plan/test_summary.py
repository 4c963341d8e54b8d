"""What `megalong plan` says about the layouts it did not propose: kinds, counts by reason, closest."""

import functools

from megalong.model.presets import preset_config
from megalong.plan.hardware import gpu_spec
from megalong.plan.memory import GB
from megalong.plan.planner import PlanRequest, check_layout, evaluate, plan
from megalong.plan.summary import closest_to_fitting, not_shown, rejection_counts

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


def test_counts_by_reason_cover_every_rejection_not_shown():
    result = _mixed_result()
    rejected = not_shown(result, top=3)
    assert {c.layout for c in result.candidates[:3]}.isdisjoint(r.layout for r in rejected)
    counts = rejection_counts(rejected)
    assert sum(n for _, n in counts) == len(rejected)
    assert [n for _, n in counts] == sorted((n for _, n in counts), reverse=True)
    reasons = dict(counts)
    assert reasons["FP8 needs FP8 tensor cores"] == sum(1 for r in rejected if "no FP8 tensor cores" in r.reason)
    assert reasons["does not fit in memory"] == sum(1 for r in rejected if r.kind == "too_large")
    assert reasons["fits, but slower"] == sum(1 for r in rejected if r.kind == "slower") > 0
    # A rule is the reason without its numbers: far fewer rules than distinct messages.
    assert len(counts) < len({r.reason for r in rejected}) / 5


def test_closest_layouts_when_nothing_fits():
    result = plan(PlanRequest(model=LLAMA3_8B, seq_length=524288, global_batch=16, nodes=1, gpus_per_node=8,
                              gpu=gpu_spec("h100"), loss_chunk_tokens=None))
    assert not result.candidates
    closest = closest_to_fitting(result, 3)
    smallest = sorted(r.memory.total for r in result.rejections if r.kind == "too_large")[:3]
    assert len(closest) == 3 and [r.memory.total for r in closest] == smallest
