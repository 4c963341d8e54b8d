"""Every parallelism gives the losses of one process (same initial weights, same data)."""

import importlib.util

import pytest

from megalong.runtime.launch import run_processes
from tests.training.helpers import read_losses, reference_run, train_from_dict

# Different layouts sum in a different order: fp32 rounding only (seen: ~1e-8 relative).
REL_TOLERANCE = 1e-5


def test_tp2_pp2_dp2_distributed_optimizer_matches_one_process(workdir, single_process_results):
    run = reference_run(workdir, "tp2-pp2-dp2", parallel={
        "tensor_parallel": 2, "pipeline_parallel": 2, "distributed_optimizer": True})
    assert run_processes(train_from_dict, 8, (run,)) == [0] * 8
    parallel = read_losses(workdir / "tp2-pp2-dp2" / "metrics.jsonl")
    single = read_losses(workdir / "reference" / "metrics.jsonl")
    assert sorted(parallel) == list(range(1, 13))
    for step in parallel:
        assert parallel[step] == pytest.approx(single[step], rel=REL_TOLERANCE), step


@pytest.mark.skipif(
    importlib.util.find_spec("megalong.data.cp_shard") is None
    or importlib.util.find_spec("megalong.model.attention") is None,
    reason="context parallelism needs megalong.data.cp_shard and megalong.model.attention (not in this build)",
)
def test_cp2_dp2_matches_one_process(workdir, single_process_results):
    run = reference_run(workdir, "cp2-dp2", parallel={"context_parallel": 2, "distributed_optimizer": True})
    assert run_processes(train_from_dict, 4, (run,)) == [0] * 4
    parallel = read_losses(workdir / "cp2-dp2" / "metrics.jsonl")
    single = read_losses(workdir / "reference" / "metrics.jsonl")
    for step in single:
        assert parallel[step] == pytest.approx(single[step], rel=REL_TOLERANCE), step
