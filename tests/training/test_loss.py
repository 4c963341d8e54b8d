"""The loss: token-averaged over the global batch, padded vocabulary excluded, and falling."""

import pytest

from tests.numerics import reordering_rtol
from tests.training.helpers import read_losses


def test_padded_vocabulary_takes_no_probability_mass(single_process_results):
    result = single_process_results["padded"]
    assert result["padded"] == 512 and result["first_padded_column"] == 500
    assert result["full_vocab_vs_reference"] > 1e-2  # a plain CE over all 512 differs ...
    # ... ours is the softmax over the real 500: log of a reordered sum of 512 positive terms,
    # at most 512 u apart (tests/numerics.py).
    assert result["ours_vs_reference"] < reordering_rtol(512)


def test_token_average_over_uneven_batches_matches_single_process_reference(
        workdir, single_process_results, two_process_results):
    """Samples with 64, 47, 6 and 44 loss tokens: 1 process x 4 micro-batches vs DP=2 x 2."""
    reference = single_process_results["first_step"]
    assert single_process_results["uneven_code"] == 0
    assert two_process_results["uneven_dp2_codes"] == [0, 0]
    one = read_losses(workdir / "uneven-single" / "metrics.jsonl")
    two = read_losses(workdir / "uneven-dp2" / "metrics.jsonl")

    # The logged first-step loss is the token average computed by hand, not the mean of means.
    assert one[1] == pytest.approx(reference["token_average"], rel=1e-6)
    assert abs(reference["mean_of_means"] - reference["token_average"]) > 1e-3  # 1000x the tolerance
    # The same losses at DP=2; steps 2-3 also show the gradients were token-averaged.
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-6)


def test_loss_falls_on_real_text(workdir, single_process_results):
    assert single_process_results["reference_code"] == 0
    losses = read_losses(workdir / "reference" / "metrics.jsonl")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, losses
