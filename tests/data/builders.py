"""Small indexed datasets for the data tests, written with Megatron-Core's own builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_indexed(prefix: Path | str, documents: list[np.ndarray]) -> str:
    """One sequence per document (the pre-training layout); returns the prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in documents:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int32)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def unique_documents(lengths, first_token: int = 0) -> list[np.ndarray]:
    """Documents whose tokens are all distinct (consecutive ids from ``first_token``), so a
    lost or duplicated token shows up in a multiset comparison."""
    docs, start = [], first_token
    for n in lengths:
        docs.append(np.arange(start, start + int(n), dtype=np.int64))
        start += int(n)
    return docs

