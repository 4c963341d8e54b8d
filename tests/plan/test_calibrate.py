"""The calibration: published runs become planner requests with their layout pinned, and the
fit recovers constants it is given."""

import dataclasses

import pytest

from megalong.plan.calibrate import fit, predict, request_for
from megalong.plan.efficiency import EFFICIENCY
from megalong.plan.published import load_published
from megalong.plan.stack import MEGALONG, NEMO_PERFORMANCE

TABLE = load_published()
RUNS = {r.id: r for r in TABLE.runs}


def test_a_published_run_is_planned_at_its_own_layout():
    run = RUNS["mbridge-25.09-h100-llama3-70b"]  # TP4 PP8 VP5, MBS 1, FP8, 64 H100
    request = request_for(run, TABLE)
    assert request.world_size == 64 and request.gpu.name == "h100" and request.precisions == ("fp8",)
    assert request.stack == NEMO_PERFORMANCE and request.memory_headroom == 0.0
    assert request.pin.describe() == "tp=4,pp=8,cp=1,dp=2,vp=5,mbs=1,distributed_optimizer=True,precision=fp8"
    prediction = predict(run, TABLE)
    assert prediction.fits
    assert all((c.layout.tensor_parallel, c.layout.pipeline_parallel, c.layout.virtual_pipeline) == (4, 8, 5)
               for c in prediction.fitting)
    # Recomputation is not published: it is searched, the fastest layout that fits wins.
    candidate, tokens = prediction.best()
    assert tokens == max(prediction.request.global_batch * prediction.request.seq_length / c.time.total_s / 64
                         for c in prediction.fitting)
    # Other frameworks are planned as megalong would run them, FSDP where they used it.
    titan = request_for(RUNS["torchtitan-t2-64k"], TABLE)
    assert titan.stack == MEGALONG.with_(fsdp=True)


def test_fit_recovers_the_constants_that_made_the_figures():
    """Measured figures made by the planner itself with known constants: the fit, started
    elsewhere, must find them again (the fit has a unique optimum on these rows)."""
    truth = dict(EFFICIENCY)
    truth["hopper"] = dataclasses.replace(truth["hopper"], gemm_fp8=0.5, attention=0.22)
    truth["blackwell"] = dataclasses.replace(truth["blackwell"], gemm_fp8=0.33, attention=0.41)
    ids = ["nemo-ls-h100-4k", "nemo-ls-h100-256k", "nemo-ls-h100-1m", "nemo-ls-b200-8k", "nemo-ls-b200-512k"]
    predictions = [predict(RUNS[i], TABLE) for i in ids]
    for p in predictions:
        p.measured = p.best(truth)[1]
    start = {gen: dataclasses.replace(e, gemm_fp8=0.4, attention=0.3) for gen, e in EFFICIENCY.items()}
    found = fit(predictions, start=start)
    for gen in ("hopper", "blackwell"):
        assert found[gen].gemm_fp8 == pytest.approx(truth[gen].gemm_fp8, rel=0.02)
        assert found[gen].attention == pytest.approx(truth[gen].attention, rel=0.02)
    assert all(p.ratio(found) == pytest.approx(1, abs=0.01) for p in predictions)
