"""Llama-3 on Megatron-Core: configuration, size presets, RoPE and the model builder."""

from megalong.model.config import FP8Config, ModelConfig, RopeScaling
from megalong.model.presets import PRESETS, preset_config, resolve

__all__ = ["FP8Config", "ModelConfig", "PRESETS", "RopeScaling", "preset_config", "resolve"]
