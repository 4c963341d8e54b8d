"""Document-masked causal attention with context parallelism, for Megatron-Core layer specs.

Public surface (see docs/attention.md):

* :func:`core_attention_spec` (called by ``megalong.model.llama.layer_spec``): the
  core-attention ModuleSpec for a model config.
* :func:`packed_seq_params_for`: what the trainer passes as ``packed_seq_params=`` so
  attention stays inside documents.
* :func:`resolve_backend`: which kernel ``attention_backend: auto`` picks.
"""

from __future__ import annotations

import importlib.util

# Megatron-Core is imported only by the parts that need it (the layer-spec module and
# PackedSeqParams), so the kernels, the ring and the all-to-all load without it.



def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_backend(requested: str, on_gpu: bool) -> str:
    """The kernel for whole-sequence attention: "te", "flash" or "sdpa".

    ``auto``: Transformer Engine on a GPU when installed, else flash-attn on a GPU when
    installed, else PyTorch SDPA. An explicit choice that cannot run is an error.
    """
    if requested == "auto":
        if on_gpu and _installed("transformer_engine"):
            return "te"
        if on_gpu and _installed("flash_attn"):
            return "flash"
        return "sdpa"
    if requested in ("te", "flash"):
        package = {"te": "transformer_engine", "flash": "flash_attn"}[requested]
        if not on_gpu:
            raise ValueError(f"model.attention_backend={requested} needs a GPU; use sdpa (or auto) on CPU")
        if not _installed(package):
            raise ValueError(f"model.attention_backend={requested} but {package} is not installed")
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

    backend = resolve_backend(model_cfg.attention_backend, choice.on_gpu)
    return ModuleSpec(module=DocumentAttention, params={"backend": backend, "cp_comm": model_cfg.cp_comm})


__all__ = ["core_attention_spec", "packed_seq_params_for", "resolve_backend"]
