"""Document-masked attention over whole sequences on one device (no communication).

Each function takes q [S, b, hq, d] and k/v [S, b, hkv, d] in natural token order and a
:class:`DocumentLayout`, and returns [S, b, hq * d]. They are used directly when CP = 1
and after the all-to-all of the Ulysses mode (which gives each rank whole sequences for
a subset of heads).

* ``sdpa_attention``: PyTorch's scaled_dot_product_attention, one call per tile of
  queries, over the only keys that tile can see: from the start of the document of its
  first query to its last query. That is the document-block skipping; the exact mask is
  applied inside the span. Works on CPU and GPU.
* ``flash_attention``: flash-attn's variable-length kernel (GPU, flash-attn installed).
* Transformer Engine's THD kernel lives in ``te.py`` (it is a module with state).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from megalong.model.attention.blocks import DEFAULT_TILE
from megalong.model.attention.layout import DocumentLayout
from megalong.model.attention.reference import document_causal_mask


def _document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """int64 [b, S]: position where each token's document begins."""
    b, s = doc_ids.shape
    positions = torch.arange(s).expand(b, s)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(is_start, positions, torch.zeros_like(positions)), dim=1).values


def key_spans(layout: DocumentLayout, tile: int) -> list[tuple[int, int, int]]:
    """(q_start, q_end, k_start) per query tile: the key span a tile of queries can see."""
    key = ("spans", tile)
    if key not in layout._cache:
        starts = _document_starts(layout.doc_ids)
        spans = []
        for q_start in range(0, layout.seq_length, tile):
            q_end = min(q_start + tile, layout.seq_length)
            spans.append((q_start, q_end, int(starts[:, q_start].min())))
        layout._cache[key] = spans
    return layout._cache[key]


def sdpa_attention(query, key, value, layout: DocumentLayout, softmax_scale: float,
                   tile: int = DEFAULT_TILE) -> torch.Tensor:
    s, b, hq, d = query.shape
    q = query.permute(1, 2, 0, 3)  # [b, hq, S, d]
    k = key.permute(1, 2, 0, 3)
    v = value.permute(1, 2, 0, 3)
    device = query.device
    positions = layout.positions(1, 0, device)
    doc = layout.local_doc_ids(1, 0, device)
    outputs = []
    for q_start, q_end, k_start in key_spans(layout, tile):
        allowed = document_causal_mask(
            positions[q_start:q_end], doc[:, q_start:q_end], positions[k_start:q_end], doc[:, k_start:q_end]
        )
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, q_start:q_end], k[:, :, k_start:q_end], v[:, :, k_start:q_end],
            attn_mask=allowed[:, None], scale=softmax_scale, enable_gqa=hq != k.shape[1],
        ))
    out = torch.cat(outputs, dim=2)  # [b, hq, S, d]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


def cached_decode_attention(query, key, value, softmax_scale: float) -> torch.Tensor:
    """Inference with a KV cache: q [Sq, b, hq, d] are the last Sq of the Sk cached positions.

    One document per sample (generation prompts are not packed); query ``i`` sees keys up to
    position ``Sk - Sq + i``.
    """
    sq, b, hq, d = query.shape
    sk = key.shape[0]
    q_positions = torch.arange(sk - sq, sk, device=query.device)
    allowed = q_positions[:, None] >= torch.arange(sk, device=query.device)[None, :]
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
        attn_mask=allowed, scale=softmax_scale, enable_gqa=hq != key.shape[2],
    )
    return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


def flash_attention(query, key, value, layout: DocumentLayout, softmax_scale: float) -> torch.Tensor:
    """flash-attn varlen over the sample-major flattened batch (documents = varlen sequences)."""
    from flash_attn import flash_attn_varlen_func  # GPU-only; imported when used

    s, b, hq, d = query.shape
    cu = layout.flat_cu_seqlens(query.device)
    max_len = layout.max_document_length()

    def flat(x):
        return x.transpose(0, 1).reshape(b * s, x.shape[2], d)

    out = flash_attn_varlen_func(
        flat(query), flat(key), flat(value), cu, cu, max_len, max_len,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=True,
    )
    return out.reshape(b, s, hq * d).transpose(0, 1)
