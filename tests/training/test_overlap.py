"""Overlapped communication, as every ProLong recipe runs it (runtime.overlap_grad_reduce and
runtime.overlap_param_gather with the distributed optimizer), on real gloo processes.

Two process starts (tests/training/overlap.py describes the runs): DP=2 with several buckets;
PP=2 x 2 virtual stages x DP=2 (two model chunks per rank, each reduced and gathered on its
own) and PP=2 x DP=2. Each test first checks that the overlap really happened (reduces in flight when the
backward ended, gathers left to the next forward), so a run that quietly fell back to
synchronous communication fails.

Tolerances. Overlap changes when each collective runs, not what it computes, except that
several buckets cut the gradient buffer, and with it the distributed optimizer's shards,
differently from one bucket:
- Gradients of one step at the same weights are the same per-rank sums, reduced over the DP
  ranks; only the order of that DP-term sum may differ (tests/numerics.py: reordering_rtol(DP)
  of a tensor's largest element; with DP=2, a + b = b + a, so in practice they are equal).
- Step 1 has learning rate 0 (warmup), so steps 1 and 2 run at the initial weights in every
  run: their losses are the same computation on the same numbers, equal exactly.
- After a real update, shards cut differently sum the gradient norm (the clipping factor) in
  another order and run the elementwise Adam arithmetic in other vector/tail positions:
  rounding-level differences, which in fp32 stay far below helpers.REL_TOLERANCE (its
  comment derives it for per-step gradient rounding). In bf16 such a difference may round a
  weight to its other neighbour, so bf16 runs are compared after an update only where the
  buckets are cut alike (the gradient reduce overlapped alone vs both overlaps; the pipeline
  runs, whose chunks are one bucket each with or without overlap): there every step is the
  same arithmetic, and losses, gradients and saved weights must be equal exactly.
"""

from __future__ import annotations

import pytest
import torch

from megalong.convert.dist_io import CheckpointReader
from megalong.runtime.launch import run_processes
from tests.numerics import reordering_rtol
from tests.training import helpers, overlap

DP = 2


@pytest.fixture(scope="session")
def overlap_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("overlap")


@pytest.fixture(scope="session")
def two_process_overlap(overlap_dir):
    """Per rank: run name -> what train_observed returned (tests/training/overlap.py)."""
    results = run_processes(helpers.in_sequence, 2, (overlap.two_process_calls(overlap_dir),))
    return [dict(zip(overlap.TWO_PROCESS_RUNS, per_rank)) for per_rank in results]


@pytest.fixture(scope="session")
def four_process_overlap(overlap_dir):
    results = run_processes(helpers.in_sequence, 4, (overlap.four_process_calls(overlap_dir),))
    return [dict(zip(overlap.FOUR_PROCESS_RUNS, per_rank)) for per_rank in results]


def _losses(root, name) -> dict:
    return helpers.read_losses(root / name / "metrics.jsonl")


def _assert_gradients_match(actual: dict, expected: dict, what: str, exact: bool = False) -> None:
    assert actual.keys() == expected.keys(), what
    for name, grad in expected.items():
        if exact:
            assert torch.equal(actual[name], grad), f"{what}: {name}"
            continue
        bound = reordering_rtol(DP) * grad.abs().max().item()
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=bound, msg=f"{what}: {name}")


def _assert_overlapped(result: dict, gather: bool, chunks: int = 1, several_buckets: bool = False) -> None:
    """The run's gradient reduce was dispatched from the backward hooks of every bucket (from
    step 2: in step 1 Megatron-Core counts the hooks and reduces at the end), and its
    parameter all-gather was (or was not) left to the next forward after every step."""
    assert result.get("code") == 0, result.get("error")
    steps = result["steps"]
    assert len(result["buckets"]) == chunks
    if several_buckets:
        assert max(result["buckets"][0]) >= 2, f"no gradient buffer is cut into buckets: {result['buckets']}"
    for number, step in enumerate(steps[1:], start=2):
        assert all(all(chunk) for chunk in step["reduce_in_flight"]), f"step {number}: {step['reduce_in_flight']}"
    for number, step in enumerate(steps, start=1):
        assert all(all(chunk) == gather for chunk in step["gather_deferred"]), f"step {number}"


def _assert_not_overlapped(result: dict) -> None:
    assert result["code"] == 0
    for step in result["steps"]:
        assert not any(any(chunk) for chunk in step["reduce_in_flight"] + step["gather_deferred"])


def _saved_weights(root, name, step=2) -> dict:
    reader = CheckpointReader(root / name / "ckpt" / f"iter_{step:07d}" / "model")
    return reader.read({key: ((0,) * len(reader.shape(key)), reader.shape(key)) for key in reader.tensors})


def _assert_same_saved_weights(root, name, reference) -> None:
    saved, expected = _saved_weights(root, name), _saved_weights(root, reference)
    assert saved.keys() == expected.keys() and saved
    stale = [key for key in expected if not torch.equal(saved[key], expected[key])]
    assert not stale, f"{name}'s checkpoint differs from {reference}'s in {stale}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_overlapped_reduce_and_gather_over_several_buckets_give_the_plain_runs_numbers(
        overlap_dir, two_process_overlap, dtype):
    """DP=2, distributed optimizer, buckets of 20,000 parameters: the same losses and the same
    reduced gradients as without overlap (tolerances: module docstring)."""
    for rank in two_process_overlap:
        _assert_not_overlapped(rank[f"off-{dtype}"])
        _assert_overlapped(rank[f"on-{dtype}"], gather=True, several_buckets=True)
    on, off = _losses(overlap_dir, f"on-{dtype}"), _losses(overlap_dir, f"off-{dtype}")
    assert sorted(on) == sorted(off) == [1, 2, 3]
    assert (on[1], on[2]) == (off[1], off[2])
    if dtype == "fp32":
        assert on[3] == pytest.approx(off[3], rel=helpers.REL_TOLERANCE)
    for rank in two_process_overlap:
        for step in (0, 1):
            _assert_gradients_match(rank[f"on-{dtype}"]["steps"][step]["gradients"],
                                    rank[f"off-{dtype}"]["steps"][step]["gradients"], f"{dtype} step {step + 1}")


def test_the_deferred_gather_brings_every_update_and_a_save_waits_for_it(overlap_dir, two_process_overlap):
    """bf16, DP=2, the same buckets with the gradient reduce overlapped alone and with the
    parameter all-gather overlapped too: equal losses and gradients in every step, although
    each update reached the model only in the next forward; the checkpoint saved at step 2,
    while that gather was pending, holds the updated weights (equal to the other run's)."""
    for rank in two_process_overlap:
        _assert_overlapped(rank["grad-only-bf16"], gather=False, several_buckets=True)
        _assert_overlapped(rank["on-bf16"], gather=True, several_buckets=True)
    assert _losses(overlap_dir, "on-bf16") == _losses(overlap_dir, "grad-only-bf16")
    for rank in two_process_overlap:
        for step, (on, alone) in enumerate(zip(rank["on-bf16"]["steps"], rank["grad-only-bf16"]["steps"]), 1):
            _assert_gradients_match(on["gradients"], alone["gradients"], f"step {step}", exact=True)
    _assert_same_saved_weights(overlap_dir, "on-bf16", "grad-only-bf16")


def test_a_run_saved_with_a_gather_pending_resumes_exactly(overlap_dir, two_process_overlap):
    """bf16, DP=2, both overlaps: resumed from the step-2 checkpoint, step 3 has the
    uninterrupted run's loss and gradients, bit for bit."""
    for rank in two_process_overlap:
        _assert_overlapped(rank["on-bf16-resumed"], gather=True, several_buckets=True)
    resumed, uninterrupted = _losses(overlap_dir, "on-bf16-resumed"), _losses(overlap_dir, "on-bf16")
    assert sorted(resumed) == [3]
    assert resumed[3] == uninterrupted[3]
    for rank in two_process_overlap:
        (step3,) = rank["on-bf16-resumed"]["steps"]
        _assert_gradients_match(step3["gradients"], rank["on-bf16"]["steps"][2]["gradients"], "step 3", exact=True)


def test_a_nan_gradient_stops_the_run_before_the_reduce(overlap_dir, two_process_overlap):
    """check_for_nan_in_grad runs on CPU too: a NaN in one gradient of step 2 (overlapped,
    bf16) stops the run with Megatron-Core's error before any rank reduces or applies it."""
    for rank in two_process_overlap:
        result = rank["nan-gradient"]
        assert "found NaN in local grad norm" in result.get("error", ""), result.get("error", result.get("code"))
        assert len(result["steps"]) == 1  # step 2 never reached the end of its backward pass
    assert sorted(_losses(overlap_dir, "nan-gradient")) == [1]


def _assert_same_numbers(root, ranks, name, reference) -> None:
    """Equal losses and, rank by rank, gradients in every step (the buffers cut alike)."""
    losses = _losses(root, name)
    assert sorted(losses) == [1, 2, 3] and losses == _losses(root, reference)
    for rank in ranks:
        for step, (ours, theirs) in enumerate(zip(rank[name]["steps"], rank[reference]["steps"]), 1):
            _assert_gradients_match(ours["gradients"], theirs["gradients"], f"{name} step {step}")


def test_overlap_across_virtual_pipeline_chunks(overlap_dir, four_process_overlap):
    """bf16, PP=2 x 2 virtual stages x DP=2: each rank's two chunks reduce and gather on their
    own, started by the interleaved schedule. Equal losses and gradients to the run without
    overlap in every step, equal weights saved at step 2 with the gathers pending, and an exact
    resume from that checkpoint."""
    for rank in four_process_overlap:
        _assert_not_overlapped(rank["vp-off-bf16"])
        _assert_overlapped(rank["vp-on-bf16"], gather=True, chunks=2)
        _assert_overlapped(rank["vp-on-bf16-resumed"], gather=True, chunks=2)
    _assert_same_numbers(overlap_dir, four_process_overlap, "vp-on-bf16", "vp-off-bf16")
    on = _losses(overlap_dir, "vp-on-bf16")
    assert _losses(overlap_dir, "vp-on-bf16-resumed") == {3: on[3]}
    for rank in four_process_overlap:
        (step3,) = rank["vp-on-bf16-resumed"]["steps"]
        _assert_gradients_match(step3["gradients"], rank["vp-on-bf16"]["steps"][2]["gradients"], "resumed step 3",
                                exact=True)
    _assert_same_saved_weights(overlap_dir, "vp-on-bf16", "vp-off-bf16")


def test_overlap_with_a_plain_pipeline(overlap_dir, four_process_overlap):
    """bf16, PP=2 x DP=2 (1F1B, whose schedule starts the gradient reduce itself): the numbers
    of the run without overlap."""
    for rank in four_process_overlap:
        _assert_not_overlapped(rank["pp-off-bf16"])
        _assert_overlapped(rank["pp-on-bf16"], gather=True)
    _assert_same_numbers(overlap_dir, four_process_overlap, "pp-on-bf16", "pp-off-bf16")
