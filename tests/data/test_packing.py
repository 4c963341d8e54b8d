"""Packing: no token lost or duplicated over a pass, correct boundaries, labels and masks."""

from collections import Counter

import numpy as np
import pytest

from megalong.data.mixture import DomainSource, DomainSpec
from megalong.data.packing import ConcatIndex, ConversationPackIndex, LongChunkIndex, build_index
from tests.data.builders import unique_documents, write_indexed

S = 128


def _source(tmp_path, lengths, kind, seq_length=S, chunk_length=None, seed=7, name="d"):
    prefix = write_indexed(tmp_path / name, unique_documents(lengths))
    spec = DomainSpec(name=name, weight=1, paths=[prefix], kind=kind, chunk_length=chunk_length)
    return DomainSource(spec, "", seq_length, seed, pad_token_id=-1, allow_repeat=True)


def _document_of(lengths):
    """token value -> (document, position inside it) for unique_documents(lengths)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return lambda tok: (int(np.searchsorted(starts, tok, side="right") - 1),
                        int(tok - starts[np.searchsorted(starts, tok, side="right") - 1]))


def _check_sample_against_documents(sample, lengths, pieces_are_whole_docs=False, chunks_end_documents=False):
    """Every segment is a run of consecutive tokens of one document; positions restart per
    segment (validate); labels are next tokens; the loss is off exactly where the next
    token belongs to another document."""
    sample.validate()
    locate = _document_of(lengths)
    cu = sample.cu_seqlens
    for a, b in zip(cu[:-1], cu[1:]):
        seg = sample.tokens[a:b]
        assert np.all(np.diff(seg) == 1), "a segment must be consecutive tokens of one document"
        doc, pos = locate(seg[0])
        assert locate(seg[-1])[0] == doc
        if pieces_are_whole_docs:
            assert pos == 0 and seg.size == lengths[doc]
    np.testing.assert_array_equal(sample.labels[:-1], sample.tokens[1:])
    inner_boundaries = set(cu[1:-1].tolist())
    expected = np.array([0.0 if j + 1 in inner_boundaries else 1.0 for j in range(sample.seq_length)])
    last_doc, last_pos = locate(sample.tokens[-1])
    continues = last_pos + 1 < lengths[last_doc] and not chunks_end_documents
    expected[-1] = 1.0 if continues else 0.0
    np.testing.assert_array_equal(sample.loss_mask, expected)
    if continues:  # the label is the document's real next token
        assert sample.labels[-1] == sample.tokens[-1] + 1


def test_concat_one_pass_neither_loses_nor_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 300, size=199)]  # some longer than a sample
    lengths.append((-sum(lengths)) % S or S)  # the epoch is a whole number of samples
    src = _source(tmp_path, lengths, "concat")
    total = int(sum(lengths))
    assert total % S == 0 and src.index.whole_samples_per_epoch == total // S
    drawn = []
    for k in range(total // S):
        sample = src.read(src.layout(k))
        _check_sample_against_documents(sample, lengths)
        drawn.append(sample.tokens)
    drawn = np.concatenate(drawn)
    assert Counter(drawn.tolist()) == Counter(range(total))
    assert max(lengths) > S  # a document was split


def test_concat_epochs_chain_without_loss(tmp_path):
    lengths = [40, 90, 10, 52]  # 192 tokens = 1.5 samples per epoch
    src = _source(tmp_path, lengths, "concat")
    tokens = np.concatenate([src.read(src.layout(k)).tokens for k in range(3)])  # two epochs
    assert Counter(tokens.tolist()) == Counter(list(range(192)) * 2)
    # The sample straddling the epochs is made of both epochs' shuffles (different order).
    first, second = tokens[:192], tokens[192:]
    assert not np.array_equal(first, second)


def test_long_chunks_are_single_document_and_remainders_dropped(tmp_path):
    lengths = [S - 1, S, 3 * S + 17, 2 * S, 5, 7 * S + 1]
    src = _source(tmp_path, lengths, "long")
    n = src.index.whole_samples_per_epoch
    assert n == 1 + 3 + 2 + 7
    drawn = []
    for k in range(n):
        sample = src.read(src.layout(k))
        _check_sample_against_documents(sample, lengths, chunks_end_documents=True)
        assert sample.cu_seqlens.tolist() == [0, S]
        assert sample.loss_mask[-1] == 0 and sample.loss_mask[:-1].all()
        drawn.append(sample.tokens)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    kept = [t for d, L in enumerate(lengths) for t in range(starts[d], starts[d] + (L // S) * S)]
    assert Counter(np.concatenate(drawn).tolist()) == Counter(kept)
    dropped = src.index.dropped
    assert dropped.documents == 2 and dropped.tokens == sum(lengths) - len(kept)


def test_long_chunks_shorter_than_the_sample_are_packed_as_separate_documents(tmp_path):
    # Stage 2 style: 64K-chunks of the ">= 64K" domains inside 512K samples.
    lengths = [4 * 32 + 3, 32 * 5, 31, 32 * 3]
    src = _source(tmp_path, lengths, "long", seq_length=S, chunk_length=32)
    assert src.index.chunks_per_sample == 4 and src.index.num_chunks == 12
    drawn = []
    for k in range(3):
        sample = src.read(src.layout(k))
        _check_sample_against_documents(sample, lengths, chunks_end_documents=True)
        assert sample.cu_seqlens.tolist() == [0, 32, 64, 96, 128]
        drawn.append(sample.tokens)
    assert len(set(np.concatenate(drawn).tolist())) == 12 * 32
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        LongChunkIndex(np.array([100]), 128, 0, "x", chunk_length=48)


def test_conversation_packing_keeps_whole_conversations(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 60, size=300)
    lengths[[3, 50]] = [S + 1, 4 * S]  # too long: dropped and counted
    index = ConversationPackIndex(lengths, S, seed=3)
    n = index.whole_samples_per_epoch
    seen = []
    for k in range(n):
        layout = index.layout(k)
        assert np.all(layout.offsets == 0)
        np.testing.assert_array_equal(layout.lengths, lengths[layout.documents])
        assert layout.lengths.sum() + layout.pad_length == S
        seen.extend(layout.documents.tolist())
        if k + 1 < n:  # next-fit: the next sample's first conversation did not fit here
            nxt = index.layout(k + 1)
            assert layout.pad_length < lengths[nxt.documents[0]]
    assert sorted(seen) == sorted(set(range(300)) - {3, 50})
    assert index.dropped.documents == 2 and index.dropped.tokens == S + 1 + 4 * S


def test_layouts_are_deterministic_and_seeded():
    lengths = np.random.default_rng(2).integers(1, 500, size=1000)
    for kind in ("long", "concat", "sft"):
        a = build_index(kind, lengths, 256, seed=11, name="x")
        b = build_index(kind, lengths, 256, seed=11, name="x")
        c = build_index(kind, lengths, 256, seed=12, name="x")
        la, lb = a.layout(5), b.layout(5)
        np.testing.assert_array_equal(la.documents, lb.documents)
        np.testing.assert_array_equal(la.offsets, lb.offsets)
        assert any(not np.array_equal(a.layout(k).documents, c.layout(k).documents) for k in range(5))


def test_concat_layout_ignores_empty_documents():
    index = ConcatIndex(np.array([0, 10, 0, 300, 0]), 64, seed=0)
    assert index.dropped.documents == 3
    for k in range(4):
        assert np.all(index.layout(k).lengths > 0)
