"""The packed training sample: the contract between the data pipeline and the model.

A sample of sequence length S is cut from S + 1 consecutive stream tokens ``t``:

* ``tokens``       int64 [S]   model inputs, ``t[:S]``
* ``labels``       int64 [S]   next-token targets, ``t[1:]``
* ``loss_mask``    float32 [S] 1 where ``labels[i]`` is a prediction target. It is 0 at the
  last token of every document (its "next token" is the first token of another
  document, which ProLong never predicts across a boundary) and, for SFT, everywhere
  outside assistant turns.
* ``position_ids`` int64 [S]   position inside the token's own document (restarts at 0)
* ``cu_seqlens``   int32 [D+1] document boundaries over the S inputs: 0 = c_0 < ... < c_D = S;
  attention never crosses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedSample:
    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)

    @property
    def attention_cost(self) -> int:
        """Sum of squared document lengths: what causal document-masked attention costs."""
        lengths = self.document_lengths.astype(np.int64)
        return int((lengths * lengths).sum())

    def validate(self) -> None:
        s = self.seq_length
        for name in ("labels", "loss_mask", "position_ids"):
            if getattr(self, name).shape != (s,):
                raise ValueError(f"PackedSample.{name} has shape {getattr(self, name).shape}, expected ({s},)")
        cu = self.cu_seqlens
        if cu.ndim != 1 or cu[0] != 0 or cu[-1] != s or np.any(np.diff(cu) <= 0):
            raise ValueError(f"PackedSample.cu_seqlens must rise strictly from 0 to {s}, got {cu.tolist()}")
        expected_pos = np.concatenate([np.arange(n) for n in np.diff(cu)])
        if not np.array_equal(self.position_ids, expected_pos):
            raise ValueError("PackedSample.position_ids do not restart at every document boundary")


def collate(samples: list[PackedSample]) -> dict:
    """Stack samples into a batch of torch tensors ([B, S]); cu_seqlens stay a per-sample list."""
    import torch

    return {
        "tokens": torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64)),
        "labels": torch.from_numpy(np.stack([s.labels for s in samples]).astype(np.int64)),
        "loss_mask": torch.from_numpy(np.stack([s.loss_mask for s in samples]).astype(np.float32)),
        "position_ids": torch.from_numpy(np.stack([s.position_ids for s in samples]).astype(np.int64)),
        "cu_seqlens": [torch.from_numpy(s.cu_seqlens.astype(np.int32)) for s in samples],
    }
