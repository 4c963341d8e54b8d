"""How document boundaries reach the attention: Megatron-Core's ``PackedSeqParams``.

The trainer calls ``model(tokens, position_ids, attention_mask=None, labels=labels,
packed_seq_params=packed_seq_params_for(batch["cu_seqlens"], seq_length))``.

The params use ``qkv_format="sbhd"`` on purpose: with "thd", Megatron-Core would squeeze
the batch dimension and apply RoPE per document (positions restarting at each boundary)
and would not slice RoPE per CP rank the way the load-balanced token layout needs.
With "sbhd", Megatron-Core applies RoPE at global positions (as ProLong does) and passes
the params through untouched to the core attention. ``max_seqlen_q/kv`` are the full
(unsharded) sequence length because Megatron-Core sizes its RoPE table from them.
``cu_seqlens_q/kv`` hold the boundaries of the whole micro-batch flattened sample-major
(sample ``b`` starts at ``b * S``), the usual packed convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megalong.model.attention.layout import DocumentLayout, document_ids


@dataclass
class DocumentPackedSeqParams(PackedSeqParams):
    """PackedSeqParams plus the per-token document layout, computed once per micro-batch."""

    layout: Optional[DocumentLayout] = None


def packed_seq_params_for(
    cu_seqlens: Optional[Sequence[torch.Tensor]], seq_length: int
) -> Optional[DocumentPackedSeqParams]:
    """Params that keep attention inside documents, from each sample's full boundaries.

    ``cu_seqlens``: one int tensor per sample, 0 = c_0 < ... < c_D = seq_length (the
    ``cu_seqlens`` list of :func:`megalong.data.sample.collate`), unsharded even under CP.
    Returns None when ``cu_seqlens`` is None (plain causal attention).
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.ndim == 1:
        cu_seqlens = [cu_seqlens]
    if len(cu_seqlens) == 0:
        raise ValueError("packed_seq_params_for: empty cu_seqlens list (one tensor per sample expected)")
    pieces = []
    for b, cu in enumerate(cu_seqlens):
        cu = torch.as_tensor(cu).to(device="cpu", dtype=torch.int64)
        try:
            document_ids(cu, seq_length)
        except ValueError as error:
            raise ValueError(f"packed_seq_params_for: sample {b}: {error}") from None
        pieces.append(cu[:-1] + b * seq_length)
    flat = torch.cat(pieces + [torch.tensor([len(cu_seqlens) * seq_length])]).to(torch.int32)
    layout = DocumentLayout.from_flat_cu_seqlens(flat, seq_length)
    return DocumentPackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=flat,
        cu_seqlens_kv=flat,
        max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length,
        layout=layout,
    )


_CAUSAL_CACHE: dict = {}


def layout_from_packed_seq_params(params, batch: int, seq_length: int) -> DocumentLayout:
    """The document layout for a forward call; checks it against the tensors' shape."""
    if params is None:
        key = (batch, seq_length)
        if key not in _CAUSAL_CACHE:
            _CAUSAL_CACHE.clear()
            _CAUSAL_CACHE[key] = DocumentLayout.causal(batch, seq_length)
        return _CAUSAL_CACHE[key]
    if params.qkv_format not in (None, "sbhd"):
        raise ValueError(
            f"megalong's document attention expects packed_seq_params with qkv_format='sbhd' (got "
            f"{params.qkv_format!r}): build them with megalong.model.attention.packed_seq_params_for"
        )
    layout = getattr(params, "layout", None)
    if layout is None:
        # A plain PackedSeqParams: derive (once) from its flattened boundaries.
        layout = DocumentLayout.from_flat_cu_seqlens(params.cu_seqlens_q, seq_length)
        try:
            params.layout = layout
        except AttributeError:
            pass
    if layout.seq_length != seq_length or layout.batch != batch:
        raise ValueError(
            f"packed_seq_params describe {layout.batch} sample(s) of {layout.seq_length} tokens but the "
            f"attention got {batch} sample(s) of {seq_length} tokens (local length x context_parallel)"
        )
    return layout
