"""Document-masked causal attention with context parallelism, for Megatron-Core layer specs.

Public surface (see docs/attention.md):

* :func:`core_attention_spec` (called by ``megalong.model.llama.layer_spec``): the
  core-attention ModuleSpec for a model config.
* :func:`packed_seq_params_for`: what the trainer passes as ``packed_seq_params=`` so
  attention stays inside documents.
* :func:`resolve_backend`: which kernel ``attention_backend: auto`` picks.
"""

from __future__ import annotations

import logging

# Megatron-Core is imported only by the parts that need it (the layer-spec module and
# PackedSeqParams), so the kernels, the ring and the all-to-all load without it.

log = logging.getLogger(__name__)



def resolve_backend(requested: str, on_gpu: bool, params_dtype: str = "bf16") -> str:
    """The kernel for whole-sequence attention: "te", "flash" or "sdpa".

    ``auto``: on a GPU with bf16 parameters, Transformer Engine when it imports, else
    flash-attn when it imports; otherwise PyTorch SDPA (the only one that takes fp32). An
    explicit choice that cannot run here is an error saying why.
    """
    from megalong.model import backends

    if requested == "auto":
        if not on_gpu:
            return "sdpa"
        if params_dtype != "bf16":
            log.info("attention_backend=auto with %s parameters: PyTorch SDPA (flash-attn and Transformer "
                     "Engine attention run only in 16-bit)", params_dtype)
            return "sdpa"
        if backends.transformer_engine_version() is not None:
            return "te"
        if backends.flash_attn_usable():
            return "flash"
        return "sdpa"
    if requested in ("te", "flash"):
        if not on_gpu:
            raise ValueError(f"model.attention_backend={requested} needs a GPU; use sdpa (or auto) on CPU")
        problem = backends.attention_backend_problem(requested, params_dtype)
        if problem:
            raise ValueError(problem)
        usable = (backends.transformer_engine_version() is not None if requested == "te"
                  else backends.flash_attn_usable())
        if not usable:
            package = {"te": "transformer_engine.pytorch", "flash": "flash_attn"}[requested]
            raise ValueError(f"model.attention_backend={requested} but {package} does not import here "
                             "(pip install 'megalong[gpu]', built for this CUDA and torch)")
        return requested
    if requested == "sdpa":
        return "sdpa"
    raise ValueError(f"unknown model.attention_backend {requested!r}; choose auto, sdpa, flash or te")


def packed_seq_params_for(cu_seqlens, seq_length: int):
    """PackedSeqParams keeping attention inside documents; see :mod:`megalong.model.attention.packing`."""
    from megalong.model.attention.packing import packed_seq_params_for as build

    return build(cu_seqlens, seq_length)


def core_attention_spec(choice, model_cfg):
    """The core-attention ModuleSpec to plug into the layer spec for this model and machine."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megalong.model.attention.core import DocumentAttention

    backend = resolve_backend(model_cfg.attention_backend, choice.on_gpu, model_cfg.params_dtype)
    return ModuleSpec(module=DocumentAttention, params={"backend": backend, "cp_comm": model_cfg.cp_comm})


__all__ = ["core_attention_spec", "packed_seq_params_for", "resolve_backend"]
