"""Checkpoint conversion between Hugging Face and Megatron-Core (streaming and exact).

* :mod:`megalong.convert.adapter` — the state-dict mapping (``to_hf`` / ``from_hf``)
* :mod:`megalong.convert.hf_config` — config.json <-> ModelConfig, refusing what cannot be represented
* :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf` — the streaming converters
"""

from megalong.convert.adapter import LlamaStateDictAdapter, StateDictMismatchError, checkpoint_key
from megalong.convert.hf_config import UnsupportedConfigError, hf_config_from_model, model_config_from_hf


def convert_hf_to_megatron(*args, **kwargs):
    from megalong.convert.hf_to_megatron import convert_hf_to_megatron as convert

    return convert(*args, **kwargs)


def convert_megatron_to_hf(*args, **kwargs):
    from megalong.convert.megatron_to_hf import convert_megatron_to_hf as convert

    return convert(*args, **kwargs)


__all__ = [
    "LlamaStateDictAdapter", "StateDictMismatchError", "UnsupportedConfigError", "checkpoint_key",
    "convert_hf_to_megatron", "convert_megatron_to_hf", "hf_config_from_model", "model_config_from_hf",
]
