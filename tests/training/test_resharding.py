"""Resume at another parallel layout: the next steps' losses are those of an uninterrupted
run at that layout, and they would not be if the Adam moments or step counts were lost.

DP 2 <-> 1 (the distributed optimizer shards the Adam state over DP), CP 2 <-> 1 (from
periodic saves in the default, dp_reshardable, optimizer format), TP 2 -> 1, PP 2 -> 1, and
TP=2 x PP=2 x CP=2 -> one process (three at once; saved fully reshardable), on test-tiny (4 layers,
hidden 64: the smallest model with every parallel dimension). Sequence parallelism to and
from one process: tests/training/test_sequence_parallel.py.

The runs happen in the session fixtures (tests/training/conftest.py; the matrix is
tests/training/reshard.py).
"""

import pytest

from tests.training import reshard
from tests.training.helpers import REL_TOLERANCE, read_losses

# A resumed run starts from the weights and Adam state of the source layout's step 3, which
# differ from the target layout's own step-3 state only by the reordered sums of steps 1-3
# (moving tensors between shards at load is exact); from there both runs sum in the target's
# order. So helpers.REL_TOLERANCE (12 steps at different layouts) bounds the difference (seen:
# <= 7e-8). A run whose optimizer restarted must be told from that by far: more than 100 times
# the tolerance at some step (seen: 9e-3 relative at step 5, when forgetting everything;
# 1.2e-2 when forgetting only Adam's step count; the first resumed step's loss is computed
# before any update and does not depend on the optimizer).
DISTINCT = 100 * REL_TOLERANCE
RESUMED_STEPS = list(range(reshard.SAVED_AT + 1, reshard.STEPS + 1))


def _losses(workdir, name) -> dict:
    return read_losses(workdir / "matrix" / name / "metrics.jsonl")


def _largest_difference(losses: dict, reference: dict) -> float:
    return max(abs(losses[step] / reference[step] - 1) for step in losses)


@pytest.fixture(scope="module")
def matrix(workdir, single_process_results, two_process_results, resumed_single_process_results):
    assert single_process_results["matrix_code"] == 0
    assert two_process_results["matrix_codes"] == [[0] * len(two_process_results["matrix_codes"][0])] * 2
    assert set(resumed_single_process_results["matrix_codes"][:-1]) == {0}  # the last one is refused
    return workdir


@pytest.mark.parametrize("source,target", reshard.PAIRS, ids=[f"{s}-to-{t}" for s, t in reshard.PAIRS])
def test_resumed_at_another_layout_continues_as_if_uninterrupted(matrix, source, target):
    reference = _losses(matrix, target)
    resumed = _losses(matrix, f"{source}-to-{target}")
    assert sorted(resumed) == RESUMED_STEPS  # the step count was carried: steps 1-3 not redone
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=REL_TOLERANCE), step
    # The same comparison tells a resume that lost the optimizer state apart (see DISTINCT).
    forgetting = _losses(matrix, f"forget-all-{target}")
    assert sorted(forgetting) == RESUMED_STEPS
    assert _largest_difference(forgetting, reference) > DISTINCT


def test_a_dp_reshardable_checkpoint_resumed_at_another_tp_is_refused_in_words(matrix, resumed_single_process_results):
    """A periodic save keeps the optimizer state dp_reshardable (checkpoint.optimizer_format:
    auto); at another tensor-parallel size Megatron-Core would fail with a bare assertion."""
    from megalong.training.checkpoint import saved_optimizer_format

    source = reshard.saved(matrix, "tp2-dp-reshardable")
    assert saved_optimizer_format(source) == "dp_reshardable"
    assert saved_optimizer_format(reshard.saved(matrix, "tp2")) == "fully_reshardable"
    assert saved_optimizer_format(reshard.checkpoints(matrix, "tp2-dp-reshardable") / "iter_0000006") == \
        "fully_reshardable"  # the save of the last step
    message = resumed_single_process_results["matrix_codes"][-1]
    assert message.startswith(f"CheckpointError: {source / 'optimizer'} holds the distributed optimizer's state "
                              "in the dp_reshardable format"), message
    assert "tensor_parallel=1 (saved: 2)" in message and "init.load_optimizer=false" in message
    assert not (matrix / "matrix" / "tp2-dp-reshardable-to-one-process" / "metrics.jsonl").exists()


def test_a_resume_that_lost_only_adams_step_count_is_told_apart(matrix):
    forgetting = _losses(matrix, "forget-step-one-process")
    assert sorted(forgetting) == RESUMED_STEPS
    assert _largest_difference(forgetting, _losses(matrix, "one-process")) > DISTINCT


def test_tp2_pp2_cp2_resumed_in_one_process(workdir, single_process_results, eight_process_results,
                                            resumed_single_process_results):
    """The eight-process run (test_parallel) saved at step 6; resumed in one process, steps
    7-12 are the one-process reference run's."""
    assert [codes[0] for codes in eight_process_results] == [0] * 8
    assert resumed_single_process_results["eight_to_one_codes"] == [0, 0]
    reference = read_losses(workdir / "reference" / "metrics.jsonl")
    resumed = read_losses(workdir / "eight-to-one" / "metrics.jsonl")
    assert sorted(resumed) == list(range(7, 13))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=REL_TOLERANCE), step
    forgetting = read_losses(workdir / "eight-to-one-forgetting" / "metrics.jsonl")
    assert sorted(forgetting) == list(range(7, 13))
    assert _largest_difference(forgetting, reference) > DISTINCT
