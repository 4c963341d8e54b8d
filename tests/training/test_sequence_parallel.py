"""Sequence parallelism, the layout of every ProLong recipe, trains on the CPU as one process
does: step-1 gradients and losses (bf16 and fp32), exact resume, and resharding to and from
one process. The runs are in tests/training/sequence_parallel.py.

What breaks when sequence parallelism is wrong: without the ``sequence_parallel`` mark on the
norms' weights (megalong.model.norm) each TP rank keeps the gradient of its own half of the
positions, so the norm gradients are off by 0.09-0.52 relative (seen), the TP ranks'
copies differ and drift apart in training, and a checkpoint (which stores one copy) resumes
into other weights. Each test below catches that.
"""

import math

import pytest
import torch

from megalong.gpucheck.compare import compare_gradients
from megalong.gpucheck.tolerances import bf16_forward_bound, bf16_gradient_bound, training_loss_bound
from tests.numerics import reordering_rtol
from tests.training import sequence_parallel as sp
from tests.training.helpers import REL_TOLERANCE, read_losses

LAYERS = 4  # test-tiny
# fp32 gradients at another layout differ by reordered sums (tests/numerics.py): the longest
# behind a gradient of test-tiny are the softmax over the 512-entry padded vocabulary, the 256
# tokens of a step (4 sequences of 64) summed into each weight gradient, and the hidden/FFN sums
# (<= 128 terms) of 4 layers stacked, 512. Compared element-wise relative to the tensor's largest.
FP32_GRADIENT_RTOL = reordering_rtol(512)
SP_STEPS = list(range(1, sp.STEPS + 1))
RESUMED_STEPS = list(range(sp.SAVED_AT + 1, sp.STEPS + 1))


def _parallel_sizes(layout: str) -> dict:
    parallel = sp.LAYOUTS[layout][0]
    return {"cp": parallel.get("context_parallel", 1), "tp": parallel.get("tensor_parallel", 1)}


def bf16_gradient_tolerance(layout: str) -> float:
    """Norm-wise, per parameter: each bf16 run is within tolerances.bf16_gradient_bound of the
    exact gradients (the roundings of its layers, TP sums and CP merges counted, added in
    quadrature at u = 2^-8), so two runs differ by at most the sum of their bounds."""
    return bf16_gradient_bound(LAYERS) + bf16_gradient_bound(LAYERS, **_parallel_sizes(layout))


def bf16_loss_tolerance(layout: str, first_loss: float, loss: float) -> float:
    """tolerances.training_loss_bound with the larger (the parallel layout's) bounds: both runs'
    losses within the forward bound of exact, their descents within twice the gradient bound.
    Loose (a loss relative to itself): it catches divergence; the gradients are the sharp check."""
    sizes = _parallel_sizes(layout)
    return training_loss_bound(bf16_forward_bound(LAYERS, **sizes), bf16_gradient_bound(LAYERS, **sizes),
                               first_loss, loss)


@pytest.fixture(scope="session")
def sp_workdir(workdir):
    return sp.workdir_of(workdir)


@pytest.fixture(scope="session")
def sp_results(single_process_results, two_process_results, four_process_sp_results,
               resumed_single_process_results) -> dict:
    """Every run of tests/training/sequence_parallel.py, in the shared process starts of
    tests/training/conftest.py (1, 2, then 4, then 1 process): call name -> each rank's result."""
    return {**single_process_results["sp"], **two_process_results["sp"], **four_process_sp_results,
            **resumed_single_process_results["sp"]}


def _losses(workdir, name: str) -> dict:
    return read_losses(workdir / name / "metrics.jsonl")


def _assert_held_alike(results: list, what: str) -> None:
    """Every rank of a pipeline stage holds bitwise the same copy of each parameter (or
    gradient) held whole: the norms, whose gradients sequence parallelism sums over TP."""
    by_stage = {}
    for rank, result in enumerate(results):
        by_stage.setdefault(result.get("pipeline_rank", 0), []).append((rank, result["whole"]))
    for stage in by_stage.values():
        first_rank, first = stage[0]
        assert first, f"{what}: no parameter held whole on rank {first_rank}"
        for rank, whole in stage[1:]:
            assert whole.keys() == first.keys()
            differing = [f"{key[1]} (by {float((whole[key] - first[key]).abs().max()):.3g})"
                         for key in first if not torch.equal(whole[key], first[key])]
            assert not differing, f"{what}: rank {rank} and rank {first_rank} hold different {', '.join(differing[:3])}"


@pytest.fixture(scope="session")
def step_one(sp_workdir, sp_results) -> dict:
    """(layout, dtype) -> {"loss", "gradients" (one-process layout), "ranks" (each rank's result)}."""
    (states,) = sp_results["gradients"]
    found = {}
    for key, gradients in zip(sp.gradient_directories(sp_workdir), states):
        ranks = sp_results[f"gradients-{sp.run_name(*key)}"]
        found[key] = {"loss": ranks[0]["loss"], "gradients": gradients, "ranks": ranks}
    return found


@pytest.mark.parametrize("dtype", sp.DTYPES)
@pytest.mark.parametrize("layout", ["tp2-sp", "tp2-sp-cp2"])
def test_first_step_gradients_match_one_process(step_one, layout, dtype):
    reference, candidate = step_one[("one-process", dtype)], step_one[(layout, dtype)]
    _assert_held_alike(candidate["ranks"], f"step-1 gradients at {layout} in {dtype}")
    assert len({rank["loss"] for rank in candidate["ranks"]}) == 1
    got, ref = candidate["gradients"], reference["gradients"]
    assert got.keys() == ref.keys()
    if dtype == "fp32":
        assert candidate["loss"] == pytest.approx(reference["loss"], rel=REL_TOLERANCE)
        for name, ref_grad in ref.items():
            torch.testing.assert_close(got[name], ref_grad, rtol=FP32_GRADIENT_RTOL,
                                       atol=FP32_GRADIENT_RTOL * ref_grad.abs().max().item(), msg=f"gradient of {name}")
    else:
        loss_bound = bf16_loss_tolerance(layout, reference["loss"], reference["loss"])
        assert abs(candidate["loss"] - reference["loss"]) <= loss_bound
        figures, failures = compare_gradients(got, ref, bf16_gradient_tolerance(layout))
        assert not failures, failures
    assert all(ref_grad.abs().max() > 0 for ref_grad in ref.values())  # every parameter has a gradient


@pytest.mark.parametrize("layout,dtype", [(layout, dtype) for layout in sp.SEQUENCE_PARALLEL
                                          for dtype in sp.LAYOUTS[layout][2]])
def test_training_matches_one_process(sp_workdir, sp_results, layout, dtype):
    """Four steps (saving at step 2): the losses of one process, and every TP rank's norms alike."""
    results = sp_results[sp.run_name(layout, dtype)]
    assert [r["code"] for r in results] == [0] * sp.processes(layout)
    _assert_held_alike(results, f"{layout} in {dtype} after {sp.STEPS} steps")
    losses = _losses(sp_workdir, sp.run_name(layout, dtype))
    reference = _losses(sp_workdir, sp.run_name("one-process", dtype))
    assert sorted(losses) == SP_STEPS
    for step in SP_STEPS:
        if dtype == "fp32":  # helpers.REL_TOLERANCE: reordered sums, carried through the steps
            assert losses[step] == pytest.approx(reference[step], rel=REL_TOLERANCE), step
        else:
            bound = bf16_loss_tolerance(layout, reference[1], reference[step])
            assert abs(losses[step] - reference[step]) <= bound, step
        assert math.isfinite(losses[step])


@pytest.mark.parametrize("layout,dtype", sp.EXACT_RESUMES)
def test_resume_at_the_same_layout_is_exact(sp_workdir, sp_results, layout, dtype):
    """Steps 3-4 after a restart from the step-2 checkpoint: bitwise the uninterrupted run's."""
    name = sp.resumed_name(layout, layout, dtype)
    assert [r["code"] for r in sp_results[name]] == [0] * sp.processes(layout)
    resumed = _losses(sp_workdir, name)
    assert sorted(resumed) == RESUMED_STEPS
    uninterrupted = _losses(sp_workdir, sp.run_name(layout, dtype))
    assert {step: resumed[step] for step in RESUMED_STEPS} == {step: uninterrupted[step] for step in RESUMED_STEPS}


@pytest.mark.parametrize("source,target", sp.RESHARDS, ids=[f"{s}-to-{t}" for s, t in sp.RESHARDS])
def test_resharded_resume_continues_as_the_target_layout(sp_workdir, sp_results, source, target):
    """Saved with sequence parallelism and resumed in one process, or the other way (fp32):
    steps 3-4 are the target layout's uninterrupted run's, within reordering
    (test_resharding's bound). A checkpoint holds one copy of each norm, so the source's
    TP ranks must have held the same one."""
    for layout, name in ((source, sp.run_name(source, "fp32")), (target, sp.resumed_name(source, target, "fp32"))):
        results = sp_results[name]
        assert [r["code"] for r in results] == [0] * sp.processes(layout)
        _assert_held_alike(results, name)
    resumed = _losses(sp_workdir, sp.resumed_name(source, target, "fp32"))
    reference = _losses(sp_workdir, sp.run_name(target, "fp32"))
    assert sorted(resumed) == RESUMED_STEPS
    for step in RESUMED_STEPS:
        assert resumed[step] == pytest.approx(reference[step], rel=REL_TOLERANCE), step
