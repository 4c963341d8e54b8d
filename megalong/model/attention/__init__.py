"""Document-masked causal attention with context parallelism, for Megatron-Core layer specs.

Public surface (see docs/attention.md):

* :func:`core_attention_spec` (called by ``megalong.model.llama.layer_spec``): the
  core-attention ModuleSpec for a model config.
* :func:`packed_seq_params_for`: what the trainer passes as ``packed_seq_params=`` so
  attention stays inside documents.
* :func:`resolve_backend` (from :mod:`megalong.model.backends`): which kernel
  ``attention_backend: auto`` picks.
"""

from __future__ import annotations

# Megatron-Core is imported only by the parts that need it (the layer-spec module and
# PackedSeqParams), so the kernels, the ring and the all-to-all load without it. Which kernel
# runs is decided with the machine's other kernel choices (megalong.model.backends).
from megalong.model.backends import resolve_backend


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
