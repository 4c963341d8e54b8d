import numpy as np


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
