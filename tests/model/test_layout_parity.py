"""Same weights, same numbers, whatever the parallel layout (real gloo processes)."""

from __future__ import annotations

import pytest
import torch

from megalong.config import ParallelConfig
from megalong.runtime.launch import run_processes
from tests.model import parity_workers as workers

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    weights = tmp_path_factory.mktemp("ref") / "weights"
    run_processes(workers.save_reference_weights, 1, (str(weights),))
    (ref,) = run_processes(workers.logits_and_losses, 1, (ParallelConfig(), str(weights)))
    return str(weights), ref


@pytest.fixture(scope="module")
def reference_step(reference, tmp_path_factory):
    weights, _ = reference
    ref_dir = str(tmp_path_factory.mktemp("step") / "ref")
    (norm,) = run_processes(workers.one_optimizer_step, 1, (ParallelConfig(), weights, ref_dir))
    return ref_dir, norm


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item(), msg=what)


@pytest.mark.parametrize(
    "layout,world",
    [
        (ParallelConfig(tensor_parallel=2), 2),
        (ParallelConfig(pipeline_parallel=2), 2),
        (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 4),
        (ParallelConfig(distributed_optimizer=True), 2),  # DP=2
    ],
    ids=["tp2", "pp2", "tp2xpp2", "dp2"],
)
def test_logits_and_loss_match_single_process(reference, layout, world):
    weights, ref = reference
    results = [r for r in run_processes(workers.logits_and_losses, world, (layout, weights)) if r]
    covered = 0
    for result in results:
        start, stop = result["rows"]
        _assert_close(result["logits"], ref["logits"][start:stop], f"logits rows {start}:{stop}")
        _assert_close(result["losses"], ref["losses"][start:stop], f"losses rows {start}:{stop}")
        covered += stop - start
    assert covered == workers.BATCH


@pytest.mark.parametrize(
    "layout,world",
    [(ParallelConfig(tensor_parallel=2), 2), (ParallelConfig(distributed_optimizer=True), 2)],
    ids=["tp2", "dp2-distributed-optimizer"],
)
def test_one_optimizer_step_matches_single_process(reference, reference_step, tmp_path, layout, world):
    weights, _ = reference
    ref_dir, ref_norm = reference_step
    out_dir = tmp_path / "step_layout"
    norms = run_processes(workers.one_optimizer_step, world, (layout, weights, str(out_dir)))
    assert norms[0] == pytest.approx(ref_norm, rel=1e-5)

    ((initial, expected, actual),) = run_processes(
        workers.load_states, 1, ([weights, ref_dir, str(out_dir)],)
    )
    moved = 0
    for name, value in expected.items():
        _assert_close(actual[name], value, name)
        moved += int(not torch.equal(value, initial[name]))
    assert moved == len(expected), "every parameter should have been updated by the step"
