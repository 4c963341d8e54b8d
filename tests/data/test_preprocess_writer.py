"""The streaming writer produces exactly Megatron-Core's bytes and only ever complete files."""

import numpy as np
import pytest
import torch
from megatron.core.datasets import indexed_dataset as mcore

from megalong.data.preprocess import indexed_writer
from megalong.data.preprocess.indexed_writer import IndexedDatasetWriter, read_index


def _documents(seed=0, count=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128256, size=int(rng.integers(1, 300)), dtype=np.int64) for _ in range(count)]


def test_format_constants_match_megatron_core():
    assert indexed_writer.INDEX_HEADER == mcore._INDEX_HEADER
    for dtype, code in indexed_writer.DTYPE_CODES.items():
        assert mcore.DType.code_from_dtype(dtype.type) == code


def test_bytes_equal_megatron_builder_and_read_back(tmp_path, monkeypatch):
    docs = _documents()
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [doc.size])
    builder.finalize(str(tmp_path / "ref.idx"))

    monkeypatch.setattr(indexed_writer, "_CHUNK", 7)  # exercise the streamed index blocks
    with IndexedDatasetWriter(tmp_path / "ours") as writer:
        writer.add_documents(np.concatenate(docs[:20]), [d.size for d in docs[:20]])
        writer.add_documents(np.concatenate(docs[20:]), [d.size for d in docs[20:]])
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()

    dataset = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == len(docs) and dataset.index.dtype == np.int32
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(dataset[i], doc)
    dtype, lengths = read_index(tmp_path / "ours")
    assert dtype == np.int32 and list(lengths) == [d.size for d in docs]


def test_append_from_copies_documents(tmp_path):
    docs = _documents(1, 10)
    with IndexedDatasetWriter(tmp_path / "a") as writer:
        writer.add_documents(np.concatenate(docs), [d.size for d in docs])
    with IndexedDatasetWriter(tmp_path / "b") as writer, open(tmp_path / "a.bin", "rb") as handle:
        writer.append_from(handle, [d.size for d in docs])
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()


def test_empty_shard_is_readable_by_merge(tmp_path):
    # Megatron-Core cannot mmap an empty .bin; empty shards are fine (only the merge reads
    # them) and the merge refuses an empty dataset (tested in test_preprocess.py).
    with IndexedDatasetWriter(tmp_path / "empty"):
        pass
    dtype, lengths = read_index(tmp_path / "empty")
    assert lengths.size == 0 and (tmp_path / "empty.bin").stat().st_size == 0


def test_failure_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "half") as writer:
            writer.add_documents(np.arange(10), [10])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="lengths sum"):
        IndexedDatasetWriter(tmp_path / "x").add_documents(np.arange(10), [3])
