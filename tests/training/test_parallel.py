"""Every parallelism gives the losses of one process (same initial weights, same data).

One 8-process job combines TP=2 x PP=2 x CP=2. DP=2 with the distributed optimizer is
also checked against one process in the two-process job of test_loss (uneven batches), and
PP=2 with virtual stages in test_checkpoint.
"""

import pytest

from tests.training.helpers import REL_TOLERANCE, read_losses


def test_tp2_pp2_cp2_matches_one_process(workdir, single_process_results, eight_process_results):
    """12 steps at TP=2 x PP=2 x CP=2 vs the one-process run (the
    eight-process run is the conftest's; it also saves a checkpoint, see test_resharding)."""
    assert [codes[0] for codes in eight_process_results] == [0] * 8
    parallel = read_losses(workdir / "eight-processes" / "metrics.jsonl")
    single = read_losses(workdir / "reference" / "metrics.jsonl")
    assert sorted(parallel) == list(range(1, 13))
    for step in parallel:
        assert parallel[step] == pytest.approx(single[step], rel=REL_TOLERANCE), step
