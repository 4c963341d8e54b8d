"""Split a collated batch over context-parallel ranks, in Megatron's load-balanced layout.

Causal attention costs more at the end of a sequence than at its start. Megatron-Core
therefore cuts the sequence into ``2 * cp`` equal chunks and gives rank ``r`` chunks ``r``
and ``2 * cp - 1 - r``: every rank gets the same amount of work. Its RoPE slices itself
the same way, so the tokens, labels, loss mask and position ids of a batch must be
sharded exactly like this before the model sees them (:func:`shard_for_cp`).

The document boundaries (``cu_seqlens``) stay whole and unsharded: the attention knows the
layout and needs every document's full extent.

Transformer Engine's packed (THD) context parallelism wants a different layout: every
document padded to a multiple of ``2 * cp`` and split into ``2 * cp`` pieces per document.
:func:`pad_documents_for_thd` and :func:`shard_thd_for_cp` provide it, with both the real
and the padded boundaries TE needs; padding tokens get ``loss_mask = 0``.
"""

from __future__ import annotations

from typing import Sequence

import torch

SHARDED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _check(seq_length: int, cp_size: int, cp_rank: int | None = None) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp_size - 1}")
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context_parallel = {2 * cp_size}; "
            "choose data.seq_length as a multiple of it"
        )


def load_balanced_index(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (int64) of the tokens rank ``cp_rank`` keeps, in order: chunk r, then chunk 2cp-1-r."""
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


def unshard_from_cp(shards: Sequence[dict], cp_size: int) -> dict:
    """Inverse of :func:`shard_for_cp`: rank 0..cp-1 shards back into the full [B, S] batch."""
    if len(shards) != cp_size:
        raise ValueError(f"unshard_from_cp: got {len(shards)} shards for cp_size={cp_size}")
    if cp_size == 1:
        return dict(shards[0])
    out = dict(shards[0])
    for key in SHARDED_KEYS:
        if key not in shards[0]:
            continue
        local = shards[0][key]
        seq_length = local.shape[1] * cp_size
        full = local.new_empty((local.shape[0], seq_length))
        for rank, shard in enumerate(shards):
            full[:, load_balanced_index(seq_length, cp_size, rank).to(local.device)] = shard[key]
        out[key] = full
    return out


def pad_documents_for_thd(batch: dict, cp_size: int, pad_token_id: int = 0) -> dict:
    """Flatten a batch into one packed (THD) stream with every document padded to a multiple of 2*cp.

    Returns a dict with [1, T_padded] ``tokens``, ``labels``, ``loss_mask``
    (0 on padding), ``position_ids`` (continuing through the padding, as TE's THD RoPE
    expects per padded document), and int32 ``cu_seqlens`` (real document lengths,
    cumulated) and ``cu_seqlens_padded`` (padded lengths, cumulated), as TE's
    ``cu_seqlens_q`` and ``cu_seqlens_q_padded``.
    """
    multiple = 2 * cp_size
    pieces = {key: [] for key in SHARDED_KEYS}
    real, padded = [0], [0]
    for b, cu in enumerate(batch["cu_seqlens"]):
        cu = torch.as_tensor(cu).to(torch.int64).tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            length = end - start
            pad = (-length) % multiple
            for key in SHARDED_KEYS:
                piece = batch[key][b, start:end]
                if key == "position_ids":
                    filler = piece[-1] + 1 + torch.arange(pad, dtype=piece.dtype)
                elif key == "loss_mask":
                    filler = torch.zeros(pad, dtype=piece.dtype)
                else:  # tokens and labels: a pad token, never a prediction target (loss_mask 0)
                    filler = torch.full((pad,), pad_token_id, dtype=piece.dtype)
                pieces[key].append(torch.cat([piece, filler]))
            real.append(real[-1] + length)
            padded.append(padded[-1] + length + pad)
    out = {key: torch.cat(values)[None] for key, values in pieces.items()}
    # TE takes both: cu_seqlens_q (real lengths, cumulated) and cu_seqlens_q_padded.
    out["cu_seqlens"] = torch.tensor(real, dtype=torch.int32)
    out["cu_seqlens_padded"] = torch.tensor(padded, dtype=torch.int32)
    return out


def thd_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions a CP rank keeps in TE's THD layout: pieces r and 2cp-1-r of every padded document."""
    cu = torch.as_tensor(cu_seqlens_padded).to(torch.int64).tolist()
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"document of padded length {length} is not a multiple of 2 x cp = {2 * cp_size}")
        piece = length // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + chunk * piece, start + (chunk + 1) * piece))
    return torch.cat(parts)


def shard_thd_for_cp(padded: dict, cp_size: int, cp_rank: int) -> dict:
    """This rank's share of a :func:`pad_documents_for_thd` stream (boundaries stay whole)."""
    index = thd_index(padded["cu_seqlens_padded"], cp_size, cp_rank)
    out = dict(padded)
    for key in SHARDED_KEYS:
        out[key] = padded[key].index_select(1, index)
    return out
