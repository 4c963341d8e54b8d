"""megalong's core attention as a Megatron-Core module (the ``core_attention`` of a layer spec).

Megatron-Core's attention layer computes q, k, v, applies RoPE at the tokens' global
positions (slicing its tables per CP rank) and then calls this module with
q [s_local, b, hq, d] and k, v [s_local, b, hkv, d], heads already split over TP ranks and
tokens in the load-balanced CP layout. The documents come in ``packed_seq_params``
(see :func:`megalong.model.attention.packed_seq_params_for`); without it, every sample is
one document (plain causal attention). The output is [s_local, b, hq * d].
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megalong.model.attention import local, ring, ulysses
from megalong.model.attention.blocks import DEFAULT_TILE
from megalong.model.attention.layout import DocumentLayout
from megalong.model.attention.packing import layout_from_packed_seq_params

log = logging.getLogger(__name__)


class DocumentAttention(MegatronModule):
    """Causal attention restricted to documents, with ring or all-to-all context parallelism.

    ``backend`` ("sdpa", "flash" or "te": the kernel used on whole sequences) and ``cp_comm``
    ("ring" or "a2a") come from the layer spec's params
    (:func:`megalong.model.attention.core_attention_spec`). Under CP:

    * sdpa / flash: megalong's ring (per-step blocks in megalong's PyTorch block kernel,
      which returns the log-sum-exp the merge needs) or megalong's all-to-all followed by
      the backend's whole-sequence kernel;
    * te: Transformer Engine's own ring ("p2p") or all-to-all on its THD layout, after
      an exchange of tokens into that layout (``thd_relayout``).
    """

    tile: int = DEFAULT_TILE

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, backend: str = "sdpa",
                 cp_comm: str = "ring", **unused):
        super().__init__(config=config)
        if backend not in ("sdpa", "flash", "te"):
            raise ValueError(f"unknown attention backend {backend!r}; choose sdpa, flash or te")
        if cp_comm not in ("ring", "a2a"):
            raise ValueError(f"unknown cp_comm {cp_comm!r}; choose ring or a2a")
        self.backend, self.cp_comm = backend, cp_comm
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"megalong's document attention has no attention dropout (got {dropout}); "
                "Llama-3 trains without it"
            )
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by megalong's attention")
        if config.window_size is not None:
            raise ValueError("sliding-window attention is not supported by megalong's attention")
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.cp_size = config.context_parallel_size
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group if cp_group is not None else (
            parallel_state.get_context_parallel_group() if self.cp_size > 1 else None
        )
        if self.backend == "te":
            from megalong.model.attention.te import TEContextParallelKernel, TEDocumentKernel

            self.te_kernel = TEDocumentKernel(self.head_dim, self.softmax_scale, layer_number)
            # Under CP, TE's own ring / all-to-all runs on its per-document THD layout.
            self.te_cp_kernel = TEContextParallelKernel(
                self.head_dim, self.softmax_scale, layer_number, self.cp_group, self.cp_comm
            ) if self.cp_size > 1 else None
        if layer_number == 1 and (parallel_state.get_tensor_model_parallel_rank() == 0):
            log.info(
                "Core attention: megalong document-masked attention, %s kernel%s",
                {"sdpa": "PyTorch SDPA", "flash": "flash-attn varlen", "te": "Transformer Engine THD"}[self.backend],
                "" if self.cp_size == 1 else
                f", context parallel x{self.cp_size} by {self._cp_description()}",
            )

    def _cp_description(self) -> str:
        if self.backend == "te":
            return f"Transformer Engine's own {'ring (p2p)' if self.cp_comm == 'ring' else 'all-to-all'} on THD"
        return "megalong's ring (PyTorch block kernel)" if self.cp_comm == "ring" else "megalong's all-to-all"

    def _whole_sequence_attention(self, query, key, value, layout: DocumentLayout) -> torch.Tensor:
        if self.backend == "flash":
            return local.flash_attention(query, key, value, layout, self.softmax_scale)
        if self.backend == "te":
            return self.te_kernel(query, key, value, layout)
        return local.sdpa_attention(query, key, value, layout, self.softmax_scale, self.tile)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **unused):
        if attention_mask is not None:
            raise ValueError(
                "megalong's document attention is always causal and takes document boundaries from "
                "packed_seq_params (megalong.model.attention.packed_seq_params_for); call the model "
                "with attention_mask=None"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by megalong's document attention")
        s_local, batch = query.shape[0], query.shape[1]
        if key.shape[0] != s_local:
            # Megatron-Core's KV-cache inference: new queries against every cached key.
            if self.cp_size > 1 or packed_seq_params is not None:
                raise ValueError("KV-cache inference runs without context parallelism and without packing")
            return local.cached_decode_attention(query, key, value, self.softmax_scale)
        layout = layout_from_packed_seq_params(packed_seq_params, batch, s_local * self.cp_size)
        if self.cp_size == 1:
            return self._whole_sequence_attention(query, key, value, layout)
        if self.backend == "te":
            return self.te_cp_kernel(query, key, value, layout)
        if self.cp_comm == "a2a":
            return ulysses.ulysses_attention(query, key, value, layout, self.cp_group, self._whole_sequence_attention)
        return ring.ring_attention(query, key, value, layout, self.cp_group, self.softmax_scale, self.tile)
