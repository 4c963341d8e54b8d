"""Hugging Face ``config.json`` <-> megalong :class:`ModelConfig`, exactly or not at all.

RoPE settings travel both ways without loss: ``rope_theta`` stays a float and every
Llama-3 ``rope_scaling`` field (factor, low/high frequency factors, original context
length) is kept. A setting megalong's Llama cannot represent (another RoPE type, biases,
a head size that is not hidden/heads, ...) is an error naming the key, never dropped.
Both the transformers 4 layout (``rope_theta`` + ``rope_scaling``) and the transformers 5
layout (``rope_parameters``) are read, and a config whose two layouts disagree is refused;
both are written, consistently.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

from megalong.model.config import ModelConfig, RopeScaling, describe_rope

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Megatron-LM's default; Llama-3's 128,256 tokens are already a multiple of it.
DEFAULT_VOCAB_DIVISOR = 128

# HF dtype -> megalong params_dtype. fp16 weights are kept as fp16 on disk (so an export is
# bit-exact) but megalong has no fp16 training mode; they load losslessly into fp32.
_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32"}

# HF keys we read, with the value megalong's Llama always has (checked when present).
_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}
# HF keys that do not change the network (kept for the release config, or harmless).
_IGNORED = {
    "architectures", "model_type", "transformers_version", "use_cache", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "attention_dropout", "rope_theta", "rope_scaling", "rope_parameters", "head_dim",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "add_cross_attention", "is_decoder", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "torchscript", "layer_types",
    # Generation defaults that older configs carry inline.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "diversity_penalty", "num_beam_groups",
}
_LLAMA3_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DEFAULT_THETA = 10000.0  # transformers' RoPE base when a config states none
# The oldest transformers that reads every field of an export as meant: Llama-3 "llama3" RoPE
# scaling arrived in 4.43.0 (the Llama-3.1 release). Written as ``transformers_version`` when
# transformers is not installed.
MIN_TRANSFORMERS_VERSION = "4.43.0"


class UnsupportedConfigError(ValueError):
    """A Hugging Face config megalong cannot represent exactly."""


def _require(hf: dict, key: str, source: str):
    if key not in hf or hf[key] is None:
        raise UnsupportedConfigError(f"{source}: required key {key!r} is missing")
    return hf[key]


def _positive_theta(value, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UnsupportedConfigError(f"{source}: {name} must be a positive number, got {value!r}")
    return float(value)


def _read_rope(mapping: dict, key: str, top_theta: float | None, source: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) that one RoPE mapping (``rope_scaling`` or ``rope_parameters``) describes."""
    if "full_attention" in mapping and isinstance(mapping["full_attention"], dict):
        raise UnsupportedConfigError(f"{source}: per-layer-type {key} are not supported")
    own_theta = mapping.get("rope_theta")
    if own_theta is not None:
        own_theta = _positive_theta(own_theta, f"{key}.rope_theta", source)
        if top_theta is not None and own_theta != top_theta:
            # transformers 4 reads the top-level value, transformers 5 this one.
            raise UnsupportedConfigError(
                f"{source}: rope_theta={top_theta!r} disagrees with {key}.rope_theta={own_theta!r}"
            )
    theta = own_theta if own_theta is not None else top_theta if top_theta is not None else _DEFAULT_THETA
    rope_type = mapping.get("rope_type", mapping.get("type"))
    if rope_type in (None, "default"):
        extra = set(mapping) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise UnsupportedConfigError(f"{source}: {key} fields {sorted(extra)} given with rope_type default")
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"{source}: {key} rope_type={rope_type!r} cannot be represented (megalong's Llama "
            "supports no scaling or Llama-3 'llama3' scaling)"
        )
    unknown = set(mapping) - set(_LLAMA3_SCALING_FIELDS) - {"rope_type", "type", "rope_theta"}
    if unknown:
        raise UnsupportedConfigError(f"{source}: {key} has fields megalong cannot represent: {sorted(unknown)}")
    missing = [k for k in _LLAMA3_SCALING_FIELDS if mapping.get(k) is None]
    if missing:
        raise UnsupportedConfigError(f"{source}: llama3 {key} lacks {', '.join(missing)}")
    original = mapping["original_max_position_embeddings"]
    if float(original) != int(original):
        raise UnsupportedConfigError(
            f"{source}: {key}.original_max_position_embeddings must be an integer, got {original!r}"
        )
    return theta, RopeScaling(
        factor=float(mapping["factor"]),
        low_freq_factor=float(mapping["low_freq_factor"]),
        high_freq_factor=float(mapping["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _rope_settings(hf: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) as transformers reads them; RoPE descriptions that disagree are an error.

    How transformers 5 resolves the two layouts (``convert_rope_params_to_dict`` of its
    ``RotaryEmbeddingConfigMixin``): a non-empty ``rope_scaling`` mapping replaces
    ``rope_parameters`` outright; otherwise ``rope_parameters`` is used. The mapping in use
    takes its own ``rope_theta``, else the top-level ``rope_theta``, else 10,000; its
    ``rope_type`` (or legacy ``type``) defaults to "default". transformers 4 reads only the
    top-level ``rope_theta`` and ``rope_scaling``. So a config may state RoPE in up to three
    places, and it is accepted only when every place says the same: a ``rope_parameters``
    of type default next to a llama3 ``rope_scaling`` would otherwise be converted as one
    model while transformers runs the other.
    """
    top_theta = hf.get("rope_theta")
    if top_theta is not None:
        top_theta = _positive_theta(top_theta, "rope_theta", source)
    readings: dict[str, tuple[float, RopeScaling | None]] = {}
    for key in ("rope_scaling", "rope_parameters"):  # the order in which transformers 5 prefers them
        mapping = hf.get(key)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            raise UnsupportedConfigError(f"{source}: {key} must be a mapping or null, got {mapping!r}")
        if mapping:  # transformers treats an empty mapping as absent
            readings[key] = _read_rope(mapping, key, top_theta, source)
    if not readings:
        return (top_theta if top_theta is not None else _DEFAULT_THETA), None
    (used_key, used), *others = readings.items()
    for other_key, other in others:
        if other != used:
            raise UnsupportedConfigError(
                f"{source}: {used_key} ({describe_rope(*used)}) disagrees with {other_key} "
                f"({describe_rope(*other)}); transformers 5 uses {used_key} and ignores {other_key}, "
                "so the RoPE this model was trained with is ambiguous: make them agree or remove one"
            )
    return used


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig for a Hugging Face Llama config; raises UnsupportedConfigError otherwise."""
    architectures = hf.get("architectures") or []
    if hf.get("model_type") not in (None, "llama") or any(a not in SUPPORTED_ARCHITECTURES for a in architectures):
        raise UnsupportedConfigError(
            f"{source}: unknown architecture {architectures or hf.get('model_type')!r} "
            f"(model_type {hf.get('model_type')!r}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for key, expected in _FIXED.items():
        if key in hf and hf[key] is not None and hf[key] != expected:
            raise UnsupportedConfigError(f"{source}: {key}={hf[key]!r} cannot be represented (megalong needs {expected!r})")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        raise UnsupportedConfigError(f"{source}: attention_dropout={hf['attention_dropout']!r} is not supported (needs 0)")
    if hf.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise UnsupportedConfigError(f"{source}: partial_rotary_factor={hf['partial_rotary_factor']!r} is not supported")
    unknown = sorted(
        k for k in set(hf) - set(_IGNORED) - set(_FIXED) - {"partial_rotary_factor"} if not k.startswith("_")
    )
    if unknown:
        raise UnsupportedConfigError(
            f"{source}: unknown config key(s) {', '.join(unknown)}; refusing to guess what they change"
        )

    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise UnsupportedConfigError(
            f"{source}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
            "megalong's Llama needs head_dim = hidden_size / num_attention_heads"
        )
    theta, scaling = _rope_settings(hf, source)
    dtype = hf.get("torch_dtype", hf.get("dtype")) or "float32"
    if dtype not in _TORCH_DTYPES:
        raise UnsupportedConfigError(f"{source}: torch_dtype={dtype!r} is not supported")
    hf_extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    hf_extra["torch_dtype"] = dtype
    return ModelConfig(
        preset=None,
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(_require(hf, "vocab_size", source)),
        max_position_embeddings=int(_require(hf, "max_position_embeddings", source)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        make_vocab_size_divisible_by=DEFAULT_VOCAB_DIVISOR,
        params_dtype=_TORCH_DTYPES[dtype],
        extra={"hf": hf_extra},
    )


def hf_config_from_model(model: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """The config.json of a Hugging Face release of ``model`` (a resolved ModelConfig)."""
    hf_extra = dict((model.extra or {}).get("hf", {}))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rope_theta),
        "rope_scaling": None,
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": model.init_method_std,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "transformers_version": transformers_version(),
    }
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rope_theta)}
    if model.rope_scaling:  # None and False: no scaling
        s = model.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(s.factor),
            "low_freq_factor": float(s.low_freq_factor),
            "high_freq_factor": float(s.high_freq_factor),
            "original_max_position_embeddings": int(s.original_max_position_embeddings),
        }
        rope_parameters = {**config["rope_scaling"], "rope_theta": float(model.rope_theta)}
    config["rope_parameters"] = rope_parameters
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in hf_extra:
            config[key] = hf_extra[key]
    return config


def transformers_version() -> str:
    """The ``transformers_version`` of an exported config.json: the installed transformers (what
    its own ``save_pretrained`` would write), else :data:`MIN_TRANSFORMERS_VERSION`.

    transformers reads the field to decide compatibility fixes. 5.x, for one, assumes that a
    tokenizer next to a config without it may carry the faulty Mistral pre-tokenizer regex and
    warns of "an incorrect regex pattern" on every load (``TokenizersBackend``; configs from
    4.57.2 or older with a non-Mistral model_type, or newer than 4.57.3, are left alone).
    """
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return MIN_TRANSFORMERS_VERSION


def torch_dtype_name(dtype) -> str:
    import torch

    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
