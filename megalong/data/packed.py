"""Pre-packed samples (ProLong's released data) as a Megatron-Core indexed dataset.

ProLong's packed MDS sets hold samples already cut to the training length, each with the
``(start, end)`` spans of the documents inside it (``indices``) and, for SFT, a per-token
``mask``. ``megalong preprocess --input-format mds`` stores them so that a mixture domain of
``kind: packed`` trains on exactly those samples:

* one Megatron *document* per packed sample (the sample grouping, kept in the ``.idx``'s
  document index), its tokens exactly as released;
* without a mask: one *sequence* per span (plain indexed dataset);
* with a mask: ``multimodal=True``, one sequence per run of equal target flag inside a span,
  its mode ``MODE_TARGET`` (mask != 0: ProLong's collator ignores a label only where
  ``mask == 0``, training/dataset.py:66-67) plus ``MODE_SPAN_START`` on the run that opens
  a span.

The sidecar ``<prefix>.json`` says ``"kind": "packed"`` and whether a mask is stored.
This module has no torch import at module level: preprocessing workers use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIDECAR_KIND = "packed"
MODE_TARGET = 1
MODE_SPAN_START = 2


def sequences_of_sample(span_lengths: np.ndarray, target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(sequence lengths, modes or None) storing one sample of spans ``span_lengths`` and,
    if given, its per-token ``target`` flags."""
    span_lengths = np.asarray(span_lengths, dtype=np.int64)
    if target is None:
        return span_lengths.astype(np.int32), None
    target = np.asarray(target, dtype=bool)
    span_starts = np.concatenate([[0], np.cumsum(span_lengths)[:-1]])
    changes = np.flatnonzero(np.diff(target.astype(np.int8))) + 1
    starts = np.union1d(span_starts, changes).astype(np.int64)
    lengths = np.diff(np.append(starts, target.size))
    modes = target[starts].astype(np.int8) * MODE_TARGET
    modes[np.isin(starts, span_starts)] += MODE_SPAN_START
    return lengths.astype(np.int32), modes


def span_lengths_of(sequence_lengths: np.ndarray, modes: np.ndarray | None) -> np.ndarray:
    """The span lengths of one sample from its stored sequences (inverse of sequences_of_sample)."""
    sequence_lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if modes is None:
        return sequence_lengths
    span_id = np.cumsum((np.asarray(modes) & MODE_SPAN_START) != 0) - 1
    return np.bincount(span_id, weights=sequence_lengths).astype(np.int64)


def read_sidecar(prefix: str) -> dict:
    path = Path(prefix + ".json")
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sidecar = {}
    if not isinstance(sidecar, dict) or sidecar.get("kind") != SIDECAR_KIND:
        raise ValueError(
            f"{prefix}: not a packed-sample dataset ({path} must exist with \"kind\": \"{SIDECAR_KIND}\"); "
            "build one from ProLong's packed MDS data with `megalong preprocess --input-format mds`")
    return sidecar


class PackedDataset:
    """Reads the samples of a packed dataset: tokens, span lengths, target flags."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        self.sidecar = read_sidecar(prefix)
        self.has_mask = bool(self.sidecar.get("loss_mask"))
        self.dataset = IndexedDataset(prefix, multimodal=self.has_mask)
        self._document_indices = np.asarray(self.dataset.document_indices, dtype=np.int64)
        self._sequence_lengths = self.dataset.sequence_lengths
        # (index.sequence_modes: IndexedDataset.sequence_modes asserts on the array itself and
        # raises for any dataset of more than one sequence, megatron-core 0.16.1)
        self._modes = self.dataset.index.sequence_modes if self.has_mask else None
        ends = np.concatenate([[0], np.cumsum(self._sequence_lengths, dtype=np.int64)])
        self.sample_lengths = ends[self._document_indices[1:]] - ends[self._document_indices[:-1]]

    def __len__(self) -> int:
        return int(self.sample_lengths.size)

    def _sequences(self, sample: int) -> slice:
        return slice(int(self._document_indices[sample]), int(self._document_indices[sample + 1]))

    def span_lengths(self, sample: int) -> np.ndarray:
        rows = self._sequences(sample)
        return span_lengths_of(self._sequence_lengths[rows], None if self._modes is None else self._modes[rows])

    def read(self, sample: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens int32 [n], target flags bool [n] or None when no mask is stored)."""
        rows = self._sequences(sample)
        # A document's sequences lie back to back in the .bin: read the sample at once from its
        # first sequence (IndexedDataset.get reads `length` tokens from there).
        tokens = self.dataset.get(rows.start, 0, int(self.sample_lengths[sample]))
        if self.has_mask:
            tokens = tokens[0]
        if self._modes is None:
            return tokens, None
        flags = (self._modes[rows] & MODE_TARGET) != 0
        return tokens, np.repeat(flags, self._sequence_lengths[rows])
