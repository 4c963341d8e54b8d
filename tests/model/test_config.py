import pytest

from megalong.config import LayoutError, ParallelConfig
from megalong.model import ModelConfig, preset_config
from megalong.model.llama import validate_layout
from megalong.model.presets import UnknownPresetError, resolve


def test_preset_fills_unset_fields_and_keeps_explicit_ones():
    cfg = preset_config("llama3-8b", num_layers=2, rope_theta=8e6)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.rope_theta) == (2, 4096, 8, 8e6)
    assert cfg.rope_scaling is None and cfg.tie_word_embeddings is False
    small = preset_config("llama3.2-1b")
    assert small.tie_word_embeddings and small.rope_scaling.factor == 32.0


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UnknownPresetError, match=r"unknown model preset 'llama4'.*llama3-8b"):
        resolve(ModelConfig(preset="llama4"))


def test_vocab_padding_for_tp():
    cfg = preset_config("llama3-8b")
    assert cfg.padded_vocab_size(1) == 128256  # 128256 = 1002 x 128
    assert cfg.padded_vocab_size(8) == 129024  # next multiple of 1024
    assert ModelConfig(vocab_size=1000, make_vocab_size_divisible_by=128).padded_vocab_size(2) == 1024


@pytest.mark.parametrize(
    "model,parallel,world,message",
    [
        (preset_config("test-tiny"), ParallelConfig(tensor_parallel=8), 8,
         r"num_attention_heads=4 is not divisible by tensor_parallel=8"),
        (preset_config("test-tiny", num_attention_heads=8, num_query_groups=2), ParallelConfig(tensor_parallel=4), 4,
         r"num_query_groups=2 \(KV heads\) is not divisible by tensor_parallel=4"),
        (preset_config("test-tiny", num_layers=3), ParallelConfig(pipeline_parallel=2), 2,
         r"num_layers=3 is not divisible by the number of pipeline stages"),
        (preset_config("test-tiny"), ParallelConfig(pipeline_parallel=2, virtual_pipeline=4), 2,
         r"num_layers=4 is not divisible by the number of pipeline stages .* = 8"),
        (ModelConfig(hidden_size=64), ParallelConfig(), 1, r"model fields not set: num_layers"),
    ],
)
def test_bad_model_layouts_name_the_values(model, parallel, world, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(model, parallel, world)
