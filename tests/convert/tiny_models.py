"""Tiny random Hugging Face Llama checkpoints for the conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch

# GQA ratios 1, 2 and 4; tied and untied; odd vocab sizes that Megatron pads differently
# at TP=1 and TP=2; float RoPE thetas with and without Llama-3 scaling.
CASES = {
    "gqa1-tied": dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=300, tie_word_embeddings=True,
                      rope_theta=10000.0),
    "gqa2-untied-scaled": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=517,
                               tie_word_embeddings=False, rope_theta=8000000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "gqa4-untied": dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=1100, tie_word_embeddings=False,
                        rope_theta=500000.0),
    "gqa4-tied-scaled": dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=999, tie_word_embeddings=True,
                             rope_theta=128000000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_config(**overrides):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)


def save_hf_model(directory: Path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Save a random LlamaForCausalLM; returns the model (eval mode, fp32 unless dtype says otherwise)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    # Random norms too, so a swapped norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def load_all_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
