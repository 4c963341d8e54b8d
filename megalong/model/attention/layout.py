"""Where every token of a packed micro-batch lives, and which document it belongs to.

Attention inside a packed sequence is allowed from query ``i`` to key ``j`` exactly when
both belong to the same document and ``j`` is not after ``i``. Everything megalong's
attention needs to know about a micro-batch is therefore, for each token it holds, its
global position in the sequence and its document id. This module computes both for any
context-parallel rank in Megatron's load-balanced layout (owned by
:func:`megalong.data.cp_shard.load_balanced_index`: rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r`` of ``2 * cp``, so every rank gets the same share of causal work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from megalong.data.cp_shard import load_balanced_index


def rank_concat_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Global positions of the sequence formed by concatenating every rank's local tokens."""
    return torch.cat([load_balanced_index(seq_length, cp_size, r) for r in range(cp_size)])


def document_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Document index (int64 [seq_length]) of every position, from boundaries ``0 < ... < S``."""
    cu = torch.as_tensor(cu_seqlens).to(device="cpu", dtype=torch.int64)
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_length:
        raise ValueError(
            f"cu_seqlens must run from 0 to the sequence length {seq_length}, got {cu.tolist()}"
        )
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise strictly (no empty documents), got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


@dataclass
class DocumentLayout:
    """Document ids of a micro-batch of ``batch`` packed samples of ``seq_length`` tokens.

    Built once per micro-batch (see :func:`from_flat_cu_seqlens`) and shared by every layer.
    ``doc_ids`` is int64 [batch, seq_length] on the CPU; per-device copies are cached.
    """

    seq_length: int
    doc_ids: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return int(self.doc_ids.shape[0])

    @classmethod
    def from_sample_cu_seqlens(cls, cu_seqlens: Sequence[torch.Tensor], seq_length: int) -> "DocumentLayout":
        return cls(seq_length, torch.stack([document_ids(cu, seq_length) for cu in cu_seqlens]))

    @classmethod
    def from_flat_cu_seqlens(cls, flat_cu_seqlens: torch.Tensor, seq_length: int) -> "DocumentLayout":
        """From boundaries over the batch flattened sample-major (sample b starts at b * S)."""
        cu = torch.as_tensor(flat_cu_seqlens).to(device="cpu", dtype=torch.int64)
        total = int(cu[-1])
        if total % seq_length:
            raise ValueError(
                f"packed boundaries end at {total}, not a multiple of the sequence length {seq_length}"
            )
        doc = document_ids(cu, total)
        return cls(seq_length, doc.view(total // seq_length, seq_length))

    @classmethod
    def causal(cls, batch: int, seq_length: int) -> "DocumentLayout":
        """One document per sample: plain causal attention."""
        return cls(seq_length, torch.zeros(batch, seq_length, dtype=torch.int64))

    def positions(self, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
        key = ("pos", cp_size, cp_rank, str(device))
        if key not in self._cache:
            self._cache[key] = load_balanced_index(self.seq_length, cp_size, cp_rank).to(device)
        return self._cache[key]

    def local_doc_ids(self, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
        """Document ids [batch, S / cp] of the tokens CP rank ``cp_rank`` holds."""
        key = ("doc", cp_size, cp_rank, str(device))
        if key not in self._cache:
            pos = load_balanced_index(self.seq_length, cp_size, cp_rank)
            self._cache[key] = self.doc_ids[:, pos].contiguous().to(device)
        return self._cache[key]

    def cached(self, key, compute):
        """Per-micro-batch memo (block plans, index maps): computed once, shared by all layers."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def flat_cu_seqlens(self, device=None) -> torch.Tensor:
        """int32 boundaries over the sample-major flattened batch (flash-attn / TE THD input)."""
        key = ("cu", str(device))
        if key not in self._cache:
            flat = self.doc_ids + (torch.arange(self.batch) * (int(self.doc_ids.max()) + 1))[:, None]
            flat = flat.reshape(-1)
            starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([flat.numel()])])
            self._cache[key] = cu.to(device=device, dtype=torch.int32)
        return self._cache[key]

    def max_document_length(self) -> int:
        def longest() -> int:
            cu = self.flat_cu_seqlens()
            return int((cu[1:] - cu[:-1]).max())

        return self.cached("max_document_length", longest)
