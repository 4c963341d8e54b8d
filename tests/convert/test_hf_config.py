"""config.json <-> ModelConfig: exact RoPE settings, refusal of what cannot be represented."""

import copy
import importlib.metadata

import pytest

from megalong.convert.hf_config import (
    MIN_TRANSFORMERS_VERSION, UnsupportedConfigError, hf_config_from_model, model_config_from_hf,
)
from megalong.model.config import RopeScaling

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "initializer_range": 0.02,
    "use_cache": True, "transformers_version": "4.43.0.dev0", "pretraining_tp": 1, "attention_dropout": 0.0,
}


def test_llama31_config_maps_every_field():
    cfg = model_config_from_hf(LLAMA31)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (32, 8, 128256)
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert cfg.max_position_embeddings == 131072 and cfg.params_dtype == "bf16"
    assert cfg.padded_vocab_size(1) == 128256
    back = hf_config_from_model(cfg, "bfloat16")
    for key in ("rope_theta", "rope_scaling", "max_position_embeddings", "eos_token_id", "bos_token_id",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "torch_dtype"):
        assert back[key] == LLAMA31[key], key
    assert back["rope_parameters"]["rope_theta"] == 500000.0


@pytest.mark.parametrize("theta", [8_000_000.0, 128_000_000.0, 1234567.891, 10000.5])
def test_float_theta_survives_both_ways(theta):
    hf = {**LLAMA31, "rope_theta": theta, "rope_scaling": None, "max_position_embeddings": 524288}
    cfg = model_config_from_hf(hf)
    back = hf_config_from_model(cfg, "bfloat16")
    assert back["rope_theta"] == theta and back["rope_scaling"] is None
    assert back["max_position_embeddings"] == 524288
    assert model_config_from_hf(back).rope_theta == theta


def test_transformers5_rope_parameters_layout_is_read():
    hf = {k: v for k, v in LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {**LLAMA31["rope_scaling"], "rope_theta": 8e6}
    cfg = model_config_from_hf(hf)
    assert cfg.rope_theta == 8e6 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


def test_exported_config_loads_in_transformers_with_exact_rope():
    from transformers import LlamaConfig

    cfg = model_config_from_hf({**LLAMA31, "rope_theta": 1.28e8, "max_position_embeddings": 524288})
    loaded = LlamaConfig.from_dict(hf_config_from_model(cfg, "bfloat16"))
    params = loaded.rope_parameters
    assert params["rope_theta"] == 1.28e8 and params["rope_type"] == "llama3"
    assert (params["factor"], params["low_freq_factor"], params["high_freq_factor"],
            params["original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 8192)
    assert loaded.max_position_embeddings == 524288


def test_exported_config_names_the_installed_transformers_version(monkeypatch):
    back = hf_config_from_model(model_config_from_hf(LLAMA31), "bfloat16")
    assert back["transformers_version"] == importlib.metadata.version("transformers")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    back = hf_config_from_model(model_config_from_hf(LLAMA31), "bfloat16")
    assert back["transformers_version"] == MIN_TRANSFORMERS_VERSION


LLAMA3_X8 = LLAMA31["rope_scaling"]  # llama3 scaling x8 (Llama-3.1's)
NO_TOP_THETA = {k: v for k, v in LLAMA31.items() if k != "rope_theta"}


def _transformers_rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of the RoPE transformers builds for ``hf`` (it edits the dicts it gets)."""
    from transformers import LlamaConfig

    params = LlamaConfig.from_dict(copy.deepcopy(hf)).rope_parameters
    if params["rope_type"] == "default":
        return params["rope_theta"], None
    return params["rope_theta"], RopeScaling(params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                                             params["original_max_position_embeddings"])


@pytest.mark.parametrize("hf", [
    {**LLAMA31, "rope_parameters": {**LLAMA3_X8, "rope_theta": 500000.0}},
    {**LLAMA31, "rope_parameters": dict(LLAMA3_X8)},  # theta from the top level in both
    {**LLAMA31, "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_X8.items() if k != "rope_type"}},
     "rope_parameters": {**LLAMA3_X8, "rope_theta": 500000.0}},
    {**NO_TOP_THETA, "rope_scaling": {**LLAMA3_X8, "rope_theta": 8e6}, "rope_parameters": {**LLAMA3_X8, "rope_theta": 8e6}},
    {**LLAMA31, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    {**LLAMA31, "rope_scaling": {}, "rope_parameters": {**LLAMA3_X8, "rope_theta": 500000.0}},
    {**LLAMA31, "rope_scaling": {"rope_type": "default"}, "rope_parameters": {"rope_type": "default"}},
])
def test_agreeing_rope_layouts_are_read_as_transformers_reads_them(hf):
    cfg = model_config_from_hf(copy.deepcopy(hf))
    assert (cfg.rope_theta, cfg.rope_scaling) == _transformers_rope(hf)


@pytest.mark.parametrize("hf", [
    # llama3 x8 rope_scaling next to a default rope_parameters with the same theta: this used to
    # convert to no scaling, while transformers runs llama3 scaling.
    {**LLAMA31, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    {**LLAMA31, "rope_parameters": {**LLAMA3_X8, "factor": 4.0, "rope_theta": 500000.0}},
    {**LLAMA31, "rope_scaling": {"rope_type": "default"}, "rope_parameters": dict(LLAMA3_X8)},
    # rope_scaling states no theta and there is no top-level one: transformers 5 takes 10,000.
    {**NO_TOP_THETA, "rope_parameters": {**LLAMA3_X8, "rope_theta": 8e6}},
])
def test_conflicting_rope_layouts_are_refused_naming_both(hf):
    only_parameters = {k: v for k, v in hf.items() if k != "rope_scaling"}
    # The conflict is real: transformers does not run what rope_parameters alone describes.
    assert _transformers_rope(hf) != _transformers_rope(only_parameters)
    with pytest.raises(UnsupportedConfigError, match=r"some/config.json: rope_scaling \(.*\) disagrees with "
                                                     r"rope_parameters \(.*\)"):
        model_config_from_hf(copy.deepcopy(hf), "some/config.json")


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}, "yarn"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, "lacks"),
    ({"rope_scaling": {**LLAMA31["rope_scaling"], "beta_fast": 32}}, "beta_fast"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unknown architecture"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 256}, "head_dim"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"rope_theta": "lots"}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}, "disagrees"),
])
def test_unrepresentable_settings_are_refused_by_name(change, words):
    with pytest.raises(UnsupportedConfigError, match=words):
        model_config_from_hf({**LLAMA31, **change}, "some/config.json")


def test_missing_required_key_is_named():
    hf = dict(LLAMA31)
    del hf["intermediate_size"]
    with pytest.raises(UnsupportedConfigError, match="intermediate_size"):
        model_config_from_hf(hf)
