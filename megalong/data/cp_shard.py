"""Split a collated batch over context-parallel ranks, in Megatron's load-balanced layout.

Causal attention costs more at the end of a sequence than at its start. Megatron-Core
therefore cuts the sequence into ``2 * cp`` equal chunks and gives rank ``r`` chunks ``r``
and ``2 * cp - 1 - r``: every rank gets the same amount of work. Its RoPE slices itself
the same way, so the tokens, labels, loss mask and position ids of a batch must be
sharded exactly like this before the model sees them (:func:`shard_for_cp`).

The document boundaries (``cu_seqlens``) stay whole and unsharded: the attention knows the
layout and needs every document's full extent.

This module is the one owner of that token order: the attention
(:mod:`megalong.model.attention.layout`) asks :func:`load_balanced_index` too.
"""

from __future__ import annotations

import torch

SHARDED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _check(seq_length: int, cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp_size - 1}")
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context_parallel = {2 * cp_size}; "
            "choose data.seq_length as a multiple of it"
        )


def load_balanced_index(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (int64) of the tokens rank ``cp_rank`` keeps, in order: chunk r, then chunk 2cp-1-r.

    Without context parallelism (``cp_size == 1``) the tokens are in order and any length works."""
    if cp_size == 1 and cp_rank == 0:
        return torch.arange(seq_length)
    _check(seq_length, cp_size, cp_rank)
    chunk = seq_length // (2 * cp_size)
    second = 2 * cp_size - 1 - cp_rank
    return torch.cat([
        torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
        torch.arange(second * chunk, (second + 1) * chunk),
    ])


def shard_for_cp(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's share of a collated batch: [B, S] tensors become [B, S / cp_size].

    Keys other than tokens/labels/loss_mask/position_ids (e.g. ``cu_seqlens``) are passed
    through unchanged. With ``cp_size == 1`` the batch is returned as is.
    """
    if cp_size == 1:
        return dict(batch)
    out = dict(batch)
    for key in SHARDED_KEYS:
        if key not in batch:
            continue
        tensor = batch[key]
        if tensor.ndim != 2:
            raise ValueError(f"shard_for_cp: batch[{key!r}] must be [batch, seq], got shape {tuple(tensor.shape)}")
        index = load_balanced_index(tensor.shape[1], cp_size, cp_rank).to(tensor.device)
        out[key] = tensor.index_select(1, index)
    return out
