"""RoPE inverse frequencies with a float theta and every Llama-3 scaling field.

Megatron-Core's RotaryEmbedding takes an integer base and only the scaling *factor*
(its low/high-frequency factors and original context length are fixed at Llama-3.1's
values). Converters in the field have silently dropped rope_theta or the scaling
fields because of that. megalong computes the frequencies here, exactly as Hugging Face
transformers does (same float32 arithmetic), and installs them into Megatron-Core's
rotary module, so no setting is ever lost or rounded.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megalong.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """float32 inverse frequencies [head_dim // 2], matching transformers' Llama RoPE.
    ``scaling`` None or False: none."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling:
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama-3.1 frequency-dependent scaling (``rope_type: llama3``)."""
    factor = scaling.factor
    low_freq_factor = scaling.low_freq_factor
    high_freq_factor = scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are divided by the factor; short ones are kept.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, interpolate smoothly.
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def install(rotary_module: torch.nn.Module, head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> None:
    """Replace a Megatron-Core RotaryEmbedding's frequencies with the exact ones."""
    device = rotary_module.inv_freq.device
    rotary_module.inv_freq = inverse_frequencies(head_dim, theta, scaling).to(device)
    # RotaryEmbedding.forward is lru_cached on (self, seq_len, ...): drop stale tables.
    cache_clear = getattr(type(rotary_module).forward, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
