"""Reference attention: the whole [S, S] document mask, written out.

``document_causal_mask`` is the definition of who may attend to whom (same document, not
in the future); the fast paths use it too, on one tile of queries and keys at a time
(``blocks.py``, ``local.py``). ``reference_attention`` applies it to whole sequences and is
O(S^2) in memory on purpose: nothing clever, so it can be trusted as the definition the
tests and ``tools/gpu_check.py`` check every fast backend against. Training never calls it.
"""

from __future__ import annotations

import math

import torch


def document_causal_mask(q_pos, q_doc, k_pos, k_doc) -> torch.Tensor:
    """Boolean [batch, sq, sk]: True where query i may attend to key j.

    ``*_pos`` are global positions [s]; ``*_doc`` are document ids [batch, s].
    """
    same_document = q_doc[:, :, None] == k_doc[:, None, :]
    not_in_future = k_pos[None, None, :] <= q_pos[None, :, None]
    return same_document & not_in_future


def reference_attention(query, key, value, doc_ids, softmax_scale=None) -> torch.Tensor:
    """Document-masked causal attention over full, unsharded sequences.

    query [S, B, Hq, D], key/value [S, B, Hkv, D] (GQA: Hq a multiple of Hkv),
    doc_ids int64 [B, S]. Returns [S, B, Hq * D].
    """
    seq, batch, heads, dim = query.shape
    group = heads // key.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    q = query.permute(1, 2, 0, 3)  # [B, Hq, S, D]
    k = key.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    v = value.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    positions = torch.arange(seq, device=query.device)
    allowed = document_causal_mask(positions, doc_ids.to(query.device), positions, doc_ids.to(query.device))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, Hq, S, D]
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
