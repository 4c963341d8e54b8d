"""Small Megatron indexed datasets written with Megatron-Core's own builder."""

from __future__ import annotations

import numpy as np


def write_indexed_dataset(prefix: str, documents: list[list[int]]) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def random_documents(lengths: list[int], vocab: int, seed: int = 0, first_token: int | None = None) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        doc = rng.integers(0, vocab, size=n).tolist()
        if first_token is not None:
            doc[0] = first_token
        docs.append(doc)
    return docs
