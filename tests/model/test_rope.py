"""RoPE frequencies must equal transformers' exactly, for any float theta and scaling."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megalong.model import RopeScaling
from megalong.model.rope import inverse_frequencies


@pytest.mark.parametrize("theta", [500000.0, 8e6, 1.28e8, 12345.678])
@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192), RopeScaling(32.0, 2.0, 8.0, 4096)])
def test_matches_transformers(theta, scaling):
    kwargs = dict(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072)
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    config = LlamaConfig(rope_parameters=rope, **kwargs)
    if scaling is None:
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config, "cpu")
    else:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(inverse_frequencies(128, theta, scaling), expected)


def test_scaling_changes_only_low_frequencies():
    plain = inverse_frequencies(128, 500000.0)
    scaled = inverse_frequencies(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert torch.equal(scaled[:10], plain[:10])  # high frequencies untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8)  # lowest frequency divided by the factor
