"""Llama-3 as a Megatron-Core ``GPTModel``.

``build_model`` turns a :class:`ModelConfig` and a :class:`ParallelConfig` into the list
of model chunks this rank owns (one per virtual pipeline stage), using Megatron-Core's
own layers: its Transformer Engine spec on GPUs with TE installed, its local spec
otherwise. Which one is used is explicit in the config (``transformer_impl``) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megalong.config.parallel import ParallelConfig
from megalong.model import attention, backends, norm, presets, rope
from megalong.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """What was actually chosen for this run (logged, saved with checkpoints)."""

    transformer_impl: str  # "local" or "transformer_engine"
    on_gpu: bool


def choose_implementation(model: ModelConfig, on_gpu: bool) -> ModelChoice:
    impl = model.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if (on_gpu and backends.transformer_engine_version() is not None) else "local"
    if impl == "transformer_engine":
        if not on_gpu:
            raise ValueError("model.transformer_impl=transformer_engine needs a GPU; use 'local' on CPU")
        if backends.transformer_engine_version() is None:
            raise ValueError(
                "model.transformer_impl=transformer_engine but transformer_engine.pytorch does not import here "
                "(pip install 'megalong[gpu]', built for this CUDA and torch)"
            )
    if model.fp8 is not None and impl != "transformer_engine":
        raise ValueError("model.fp8 needs Transformer Engine layers (transformer_impl=transformer_engine)")
    return ModelChoice(transformer_impl=impl, on_gpu=on_gpu)


def transformer_config(model: ModelConfig, parallel: ParallelConfig, choice: ModelChoice):
    """The Megatron-Core TransformerConfig for a Llama-3 model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if model.params_dtype == "bf16" else torch.float32
    fp8_kwargs = {}
    if model.fp8 is not None:
        fp8_kwargs = dict(
            fp8=model.fp8.format,
            fp8_recipe=model.fp8.recipe,
            fp8_margin=model.fp8.margin,
            fp8_amax_history_len=model.fp8.amax_history_len,
            fp8_amax_compute_algo=model.fp8.amax_compute_algo,
        )
    recompute_kwargs = {}
    if model.recompute == "full":
        recompute_kwargs = dict(
            recompute_granularity="full", recompute_method="uniform",
            recompute_num_layers=model.recompute_num_layers,
        )
    elif model.recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fused kernels need CUDA (and Apex/TE); the CPU path uses the plain torch ops.
        bias_activation_fusion=choice.on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not choice.on_gpu,
        # The token-averaged loss: Megatron-Core sums losses and divides by the token count.
        calculate_per_token_loss=True,
        transformer_impl=choice.transformer_impl,
        **fp8_kwargs,
        **recompute_kwargs,
    )


def layer_spec(choice: ModelChoice, model: ModelConfig):
    """Megatron-Core's layer spec for the chosen implementation.

    The core-attention submodule is where megalong's document-masked, context-parallel
    attention plugs in (see ``megalong.model.attention``); the rest is Megatron-Core's.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if choice.transformer_impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        # Megatron-Core's local norm refuses sequence parallelism; megalong's is torch's RMSNorm
        # whose weight is marked for it (megalong.model.norm). The final norm follows the layers'.
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm.RMSNorm
    spec.submodules.self_attention.submodules.core_attention = attention.core_attention_spec(choice, model)
    return spec


def final_norm_module(choice: ModelChoice, layer):
    """The decoder's final norm, chosen for the backend.

    Megatron-Core's TransformerBlock, given a layer spec, builds its final norm as TENorm
    whenever Transformer Engine is importable, whatever the layers are; TE's norm carries an
    ``_extra_state`` the local model lacks. Choosing it here keeps a model's modules a
    function of ``transformer_impl`` alone (checkpoints of either still load into the other:
    see :func:`megalong.checkpoint.weights.load_model_state`).
    """
    if choice.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return layer.submodules.input_layernorm


def block_spec(choice: ModelChoice, model: ModelConfig, config, vp_stage):
    """The decoder block of this rank's model chunk: its layers and its final norm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = layer_spec(choice, model)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm_module(choice, layer),
    )


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> ModelConfig:
    """Check a model and a layout against each other and the world size, before any
    process group exists; returns the resolved model config. Errors name the values."""
    parallel.validate(world_size)
    model = presets.resolve(model)
    model.validate(parallel.tensor_parallel, parallel.pipeline_parallel * (parallel.virtual_pipeline or 1),
                   parallel.context_parallel)
    return model


def build_model(model: ModelConfig, parallel: ParallelConfig, *, on_gpu: bool, loss_chunk_tokens: int = 0) -> list:
    """Build this rank's model chunks (one per virtual pipeline stage).

    ``on_gpu`` is the runtime's answer (``Runtime.on_gpu``); ``loss_chunk_tokens`` > 0 computes
    the cross entropy in chunks (:class:`megalong.model.gpt.MegalongGPTModel`). Needs
    Megatron-Core's parallel state to be initialized (``megalong.runtime``).
    """
    from megatron.core import parallel_state

    from megalong.model.gpt import MegalongGPTModel

    model = validate_layout(model, parallel, torch.distributed.get_world_size())
    choice = choose_implementation(model, on_gpu)
    config = transformer_config(model, parallel, choice)
    vocab = model.padded_vocab_size(parallel.tensor_parallel)

    chunks = []
    num_chunks = parallel.virtual_pipeline or 1
    for vp_stage in range(num_chunks):
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = MegalongGPTModel(
            real_vocab_size=model.vocab_size,
            loss_chunk_tokens=loss_chunk_tokens,
            config=config,
            transformer_layer_spec=block_spec(choice, model, config, vp_stage if parallel.virtual_pipeline else None),
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_theta,
            parallel_output=True,
            vp_stage=vp_stage if parallel.virtual_pipeline else None,
        )
        rope.install(chunk.rotary_pos_emb, model.head_dim, model.rope_theta, model.rope_scaling)
        if on_gpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)

    if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        log.info(
            "Built %s (%d layers, hidden %d, %d heads / %d KV heads, vocab %d padded to %d, "
            "RoPE theta %g%s) with %s layers: %.2fM parameters on pipeline rank %d",
            model.preset or "Llama-3 model", model.num_layers, model.hidden_size,
            model.num_attention_heads, model.num_query_groups, model.vocab_size, vocab,
            model.rope_theta, f", scaling x{model.rope_scaling.factor:g}" if model.rope_scaling else "",
            "Transformer Engine" if choice.transformer_impl == "transformer_engine" else "Megatron-Core local",
            n_params / 1e6, parallel_state.get_pipeline_model_parallel_rank(),
        )
    return chunks
