"""Loss (and perplexity) by position on long held-out documents of an indexed dataset.

A model that uses its context predicts later tokens of a long document better than early
ones; a flat or rising curve past some position shows where it stops using the context.
Documents are read with Megatron-Core's ``IndexedDataset`` (the ``.bin/.idx`` files that
``megalong`` preprocessing writes). Only documents at least ``seq_length`` tokens long
are used, each once, cut to its first ``seq_length`` tokens (when the document does not
start with BOS and ``add_bos`` is set, a BOS is put in front and counts toward the
length). The documents are spread evenly over the eligible ones, so the choice is
deterministic and not biased to the start of the file.

The loss of the token at position p (given positions 0..p-1) falls in bucket
p // bucket_tokens; a bucket's loss is the mean over all its tokens of all documents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DocumentLosses:
    """Per-bucket sums of one document's token losses (what the progress file stores)."""

    document: int
    sums: list[float]
    counts: list[int]


@dataclass
class PositionBuckets:
    seq_length: int
    bucket_tokens: int
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be positive, got {self.bucket_tokens}")
        n = -(-self.seq_length // self.bucket_tokens)
        self.sums = np.zeros(n, dtype=np.float64)
        self.counts = np.zeros(n, dtype=np.int64)

    def split(self, document: int, losses: np.ndarray) -> DocumentLosses:
        """Bucket the losses of tokens at positions 1..len(losses) of one document."""
        positions = np.arange(1, len(losses) + 1)
        index = positions // self.bucket_tokens
        sums = np.bincount(index, weights=losses, minlength=len(self.sums))
        counts = np.bincount(index, minlength=len(self.counts))
        return DocumentLosses(document, sums.tolist(), counts.tolist())

    def add(self, doc: DocumentLosses) -> None:
        self.sums += np.asarray(doc.sums)
        self.counts += np.asarray(doc.counts)

    def summary(self) -> dict:
        buckets = []
        for b, (total, count) in enumerate(zip(self.sums, self.counts)):
            start = b * self.bucket_tokens
            mean = float(total / count) if count else None
            buckets.append({
                "start": start, "end": min(start + self.bucket_tokens, self.seq_length),
                "tokens": int(count), "mean_loss": mean,
                "perplexity": float(np.exp(mean)) if mean is not None else None,
            })
        total_count = int(self.counts.sum())
        mean = float(self.sums.sum() / total_count) if total_count else None
        return {
            "seq_length": self.seq_length, "bucket_tokens": self.bucket_tokens, "buckets": buckets,
            "tokens": total_count, "mean_loss": mean,
            "perplexity": float(np.exp(mean)) if mean is not None else None,
        }


def open_dataset(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    import os

    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"indexed dataset {prefix!r}: {prefix + suffix} is missing")
    return IndexedDataset(prefix)


def choose_documents(lengths: np.ndarray, needed: int, count: int) -> list[int]:
    """``count`` indices spread evenly over the documents with at least ``needed`` tokens."""
    eligible = np.flatnonzero(np.asarray(lengths) >= needed)
    if len(eligible) <= count:
        return eligible.tolist()
    picks = np.linspace(0, len(eligible) - 1, count).round().astype(np.int64)
    return eligible[picks].tolist()


def document_window(dataset, document: int, seq_length: int, bos_id: int | None, add_bos: bool) -> list[int]:
    """The first ``seq_length`` ids the model sees for ``document``."""
    first = int(dataset.get(document, 0, 1)[0])
    prepend = add_bos and bos_id is not None and first != bos_id
    take = seq_length - 1 if prepend else seq_length
    ids = dataset.get(document, 0, take).astype(np.int64).tolist()
    return ([bos_id] if prepend else []) + ids


def plan(dataset, seq_length: int, num_documents: int, source: str) -> list[int]:
    """Documents to evaluate; errors (naming the dataset) when none is long enough."""
    lengths = np.asarray(dataset.sequence_lengths)
    # seq_length tokens of its own, whether or not a BOS will be put in front (simple,
    # and the same documents whatever add_bos says).
    needed = seq_length
    documents = choose_documents(lengths, needed, num_documents)
    if not documents:
        longest = int(lengths.max()) if len(lengths) else 0
        raise ValueError(
            f"perplexity data {source}: no document has {needed} tokens or more "
            f"({len(lengths)} documents, longest {longest}); lower perplexity.seq_length"
        )
    if len(documents) < num_documents:
        log.warning(
            "perplexity data %s: only %d of the %d documents asked for are at least %d tokens long; "
            "using those %d", source, len(documents), num_documents, needed, len(documents),
        )
    return documents
