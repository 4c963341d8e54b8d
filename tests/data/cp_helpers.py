"""Test helpers for context-parallel layouts: undo Megatron's CP sharding, and build TE's
padded THD layout independently of megalong's exchange (the reference it is checked against)."""

from __future__ import annotations

from typing import Sequence

import torch

from megalong.data.cp_shard import SHARDED_KEYS, load_balanced_index


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


def shard_thd_for_cp(padded: dict, cp_size: int, cp_rank: int) -> dict:
    """This rank's share of a :func:`pad_documents_for_thd` stream (boundaries stay whole):
    pieces r and 2cp-1-r of every padded document, written out here rather than taken from
    megalong's ``thd_index``, so that the exchange is checked against an independent layout."""
    cu = padded["cu_seqlens_padded"].tolist()
    positions = []
    for start, end in zip(cu[:-1], cu[1:]):
        piece = (end - start) // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            positions.extend(range(start + chunk * piece, start + (chunk + 1) * piece))
    index = torch.tensor(positions, dtype=torch.long)
    out = dict(padded)
    for key in SHARDED_KEYS:
        out[key] = padded[key].index_select(1, index)
    return out
