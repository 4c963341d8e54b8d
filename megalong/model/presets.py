"""Size presets of the Llama-3 family (the numbers of Meta's released configs).

A preset fills every shape field of :class:`ModelConfig`; fields set explicitly in a
recipe or on the command line win over the preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megalong.model.config import ModelConfig, RopeScaling

# Text Llama-3: 128,000 BPE ranks and 256 special tokens.
LLAMA3_VOCAB_SIZE = 128256

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False, norm_epsilon=1e-5,
    ),
    "llama3-70b": dict(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False, norm_epsilon=1e-5,
    ),
    "llama3.1-8b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        tie_word_embeddings=False, norm_epsilon=1e-5,
    ),
    "llama3.2-1b": dict(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        tie_word_embeddings=True, norm_epsilon=1e-5,
    ),
    "llama3.2-3b": dict(
        num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        tie_word_embeddings=True, norm_epsilon=1e-5,
    ),
    # Llama-3-shaped toy with the real 128,256-token vocabulary: the quickstart model.
    "llama3-tiny": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
        num_query_groups=2, vocab_size=LLAMA3_VOCAB_SIZE, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, norm_epsilon=1e-5,
    ),
    # Smallest useful shape for unit tests: 4 layers so PP=2 x virtual 2 is possible.
    "test-tiny": dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=512, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=False, norm_epsilon=1e-5,
        make_vocab_size_divisible_by=64,
    ),
}


class UnknownPresetError(ValueError):
    pass


def resolve(config: ModelConfig) -> ModelConfig:
    """Return ``config`` with unset (None) shape fields filled from its preset."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise UnknownPresetError(
            f"unknown model preset {config.preset!r}; known presets: {', '.join(sorted(PRESETS))}"
        )
    preset = {"make_vocab_size_divisible_by": 128, **PRESETS[config.preset]}
    filled = {
        name: value for name, value in preset.items() if getattr(config, name) is None
    }
    return dataclasses.replace(config, **filled)


def preset_config(name: str, **overrides) -> ModelConfig:
    """A resolved ModelConfig for a preset, with explicit overrides."""
    return resolve(ModelConfig(preset=name, **overrides))
