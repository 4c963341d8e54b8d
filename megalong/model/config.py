"""Model configuration: the shape of a Llama-3 model and how its layers are implemented."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class RopeScaling:
    """Llama-3.1-style RoPE frequency scaling (``rope_type: llama3`` in Hugging Face)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def describe_rope(theta: float, scaling: Optional[RopeScaling]) -> str:
    """``theta ..., no scaling`` or ``theta ..., llama3 scaling xF (...)`` (None and False: none)."""
    if not scaling:
        return f"theta {theta!r}, no scaling"
    return (f"theta {theta!r}, llama3 scaling x{scaling.factor:g} (low_freq_factor {scaling.low_freq_factor:g}, "
            f"high_freq_factor {scaling.high_freq_factor:g}, original_max_position_embeddings "
            f"{scaling.original_max_position_embeddings})")


def rope_change(before, after) -> Optional[str]:
    """How the RoPE of model config ``after`` differs from ``before``'s, or None when it does not."""
    before_scaling, after_scaling = before.rope_scaling or None, after.rope_scaling or None
    if float(before.rope_theta) == float(after.rope_theta) and before_scaling == after_scaling:
        return None
    return f"{describe_rope(before.rope_theta, before_scaling)} -> {describe_rope(after.rope_theta, after_scaling)}"


@dataclass
class FP8Config:
    """Transformer Engine FP8 settings, passed through to Megatron-Core unchanged."""

    # "hybrid" (E4M3 forward, E5M2 backward) or "e4m3".
    format: Literal["hybrid", "e4m3"] = "hybrid"
    # Megatron-Core's fp8_recipe: "delayed", "tensorwise", "mxfp8" or "blockwise".
    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0


def all_to_all_heads_problem(query_heads_per_tp: int, context_parallel: int) -> Optional[str]:
    """Why an all-to-all (Ulysses) context parallelism cannot split ``query_heads_per_tp``
    query heads over ``context_parallel`` ranks, or None. After the exchange each rank attends
    with all tokens of heads / CP heads, so the query heads of each tensor-parallel rank must
    divide evenly; megalong's all-to-all repeats KV heads to fit, Transformer Engine's (2.10+)
    needs the KV heads to divide as well (megalong.model.backends)."""
    if context_parallel > 1 and query_heads_per_tp % context_parallel:
        return (f"all-to-all context parallelism (model.cp_comm=a2a) needs the query heads of each "
                f"tensor-parallel rank divisible by context_parallel={context_parallel}, but each rank has "
                f"{query_heads_per_tp}: use model.cp_comm=ring")
    return None


SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "norm_epsilon",
    "make_vocab_size_divisible_by",
)


@dataclass
class ModelConfig:
    """A Llama-3 family model. Start from a ``preset`` and override single fields."""

    preset: Optional[str] = None
    # Shape fields left unset (None) come from the preset; without a preset all are required.
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    vocab_size: Optional[int] = None
    # Longest sequence the model is built for (RoPE tables, position checks).
    max_position_embeddings: Optional[int] = None
    # RoPE base. A float: ProLong uses 8e6 and 1.28e8.
    rope_theta: Optional[float] = None
    # Llama-3.1-style frequency scaling (a mapping of RopeScaling's fields), or false for none.
    # Unset (null): a new stage keeps its initial checkpoint's, else the preset's (none for
    # Llama-3, x8 for Llama-3.1); false asks for none whatever the checkpoint or preset has.
    rope_scaling: Optional[Union[RopeScaling, Literal[False]]] = None
    tie_word_embeddings: Optional[bool] = None
    norm_epsilon: Optional[float] = None
    init_method_std: float = 0.02
    # Vocab is padded to a multiple of this x TP, as Megatron-LM does.
    make_vocab_size_divisible_by: Optional[int] = None
    # "auto" picks Transformer Engine when it is installed and a GPU is in use.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Core attention backend (document masking and context parallelism): see megalong.model.attention.
    attention_backend: Literal["auto", "sdpa", "flash", "te"] = "auto"
    # Context-parallel communication for megalong's own attention: "ring" (p2p K/V) or "a2a" (Ulysses).
    cp_comm: Literal["ring", "a2a"] = "ring"
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    fp8: Optional[FP8Config] = None
    # Activation recomputation: None, "selective" (core attention) or "full" (whole layers).
    recompute: Optional[Literal["selective", "full"]] = None
    recompute_num_layers: int = 1
    extra: dict = field(default_factory=dict)

    def for_inference(self) -> "ModelConfig":
        """The same weights, built to run anywhere: how the layers ran in training (FP8,
        recomputation, a forced layer or attention implementation) is a training setting, not
        a property of the weights. TE's FP8 layers need token counts divisible by 8/16, which
        arbitrary prompts and one-token decode steps are not."""
        return dataclasses.replace(self, fp8=None, recompute=None, transformer_impl="auto", attention_backend="auto")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, tensor_parallel: int = 1, pipeline_stages: int = 1, context_parallel: int = 1) -> None:
        """Check the shape against itself and the parallel layout; names the values."""
        from megalong.config.parallel import LayoutError

        missing = [name for name in SHAPE_FIELDS if getattr(self, name) is None]
        if missing:
            raise LayoutError(
                f"model fields not set: {', '.join(missing)} (set them, or choose a model.preset)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise LayoutError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise LayoutError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.num_attention_heads % tensor_parallel:
            raise LayoutError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_parallel={tensor_parallel}"
            )
        if self.num_query_groups % tensor_parallel:
            raise LayoutError(
                f"model.num_query_groups={self.num_query_groups} (KV heads) is not divisible by "
                f"tensor_parallel={tensor_parallel}"
            )
        if self.ffn_hidden_size % tensor_parallel:
            raise LayoutError(
                f"model.ffn_hidden_size={self.ffn_hidden_size} is not divisible by "
                f"tensor_parallel={tensor_parallel}"
            )
        if self.num_layers % pipeline_stages:
            raise LayoutError(
                f"model.num_layers={self.num_layers} is not divisible by the number of pipeline "
                f"stages (pipeline_parallel x virtual_pipeline) = {pipeline_stages}"
            )
        if self.rope_theta <= 0:
            raise LayoutError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.cp_comm == "a2a":
            problem = all_to_all_heads_problem(self.num_attention_heads // tensor_parallel, context_parallel)
            if problem:
                raise LayoutError(problem)
