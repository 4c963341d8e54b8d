import numpy as np
import pytest

from tests.eval.chunked_losses import loss_tolerance
from tests.eval.tiny_models import CHECK_CHUNK


def test_megalong_runner_is_causal_and_decodes_greedily(tiny_model):
    _, result = tiny_model
    full, prefix = np.array(result["full"]), np.array(result["prefix"])
    assert full.shape == (119,) and np.isfinite(full).all()
    # Later tokens never change the loss of earlier ones (causal attention without a mask).
    np.testing.assert_allclose(full[:39], prefix, rtol=1e-5, atol=1e-5)
    # KV-cache greedy decoding gives the tokens that recomputing the sequence gives, starts
    # with the argmax of the last position, and stops before a stop id.
    assert len(result["generated"]) == 6 and result["generated"] == result["recomputed"]
    assert len(set(result["generated"])) > 1  # a real sequence, not one token repeated
    assert result["generated"][0] == result["first"]
    assert result["stopped"] == []


@pytest.mark.parametrize("model", ["losses", "padded_vocab"])
def test_chunked_losses_equal_the_full_logits_ones(tiny_model, model):
    result = tiny_model[1][model]
    chunked, reference = np.array(result["chunked"]), np.array(result["reference"])
    assert chunked.shape == (119,)
    if model == "padded_vocab":  # Megatron's padding rows exist and take no probability
        assert result["padded_vocab"] == 129000 and result["vocab_size"] == 128256
    tolerance = loss_tolerance(result["padded_vocab"], result["hidden_size"], result["max_abs_logit"],
                               result["max_abs_dot"])
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=tolerance)
    # Tight enough to see a loss at the wrong position.
    assert not np.allclose(chunked[1:], reference[:-1], rtol=0, atol=tolerance)


def test_chunked_losses_never_hold_more_than_one_chunk_of_logits(tiny_model):
    result = tiny_model[1]["losses"]
    # The largest tensor computing the losses allocates is at most one chunk of fp32 logits,
    # while the full-logits path allocates all 119 positions' (the check sees them).
    chunk_logits = CHECK_CHUNK * result["padded_vocab"] * 4
    assert result["chunked_bytes"] <= chunk_logits, result["chunked_op"]
    assert result["full_logits_bytes"] >= 119 * result["padded_vocab"] * 4, result["full_logits_op"]
