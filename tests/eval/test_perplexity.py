import numpy as np
import pytest

from megalong.eval import perplexity as ppl
from tests.eval.datasets import random_documents, write_indexed_dataset


def test_buckets_average_token_losses_by_position():
    buckets = ppl.PositionBuckets(seq_length=10, bucket_tokens=4)
    # Losses of the tokens at positions 1..9.
    doc_a = buckets.split(0, np.arange(1, 10, dtype=float))
    doc_b = buckets.split(1, np.full(9, 2.0))
    assert doc_a.counts == [3, 4, 2]
    assert doc_a.sums == [1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9]
    buckets.add(doc_a)
    buckets.add(doc_b)
    summary = buckets.summary()
    assert [b["tokens"] for b in summary["buckets"]] == [6, 8, 4]
    assert summary["buckets"][0]["mean_loss"] == pytest.approx((6 + 6) / 6)
    assert summary["buckets"][2] == {"start": 8, "end": 10, "tokens": 4, "mean_loss": pytest.approx(21 / 4),
                                     "perplexity": pytest.approx(np.exp(21 / 4))}
    assert summary["mean_loss"] == pytest.approx((45 + 18) / 18)
    assert summary["perplexity"] == pytest.approx(np.exp(summary["mean_loss"]))


def test_documents_are_chosen_evenly_among_the_long_ones():
    lengths = np.array([5, 50, 60, 3, 70, 80, 90, 10])
    assert ppl.choose_documents(lengths, 50, 10) == [1, 2, 4, 5, 6]
    assert ppl.choose_documents(lengths, 50, 3) == [1, 4, 6]
    assert ppl.choose_documents(lengths, 100, 3) == []


def test_windows_from_a_real_indexed_dataset(tmp_path):
    bos = 500
    docs = random_documents([40, 10, 64, 33], vocab=400, seed=3)
    docs[3][0] = bos
    prefix = write_indexed_dataset(str(tmp_path / "heldout"), docs)
    dataset = ppl.open_dataset(prefix)
    assert ppl.plan(dataset, 32, 8, prefix) == [0, 2, 3]
    # A BOS goes in front of a document without one, and counts toward the length.
    assert ppl.document_window(dataset, 0, 32, bos, True) == [bos] + docs[0][:31]
    assert ppl.document_window(dataset, 0, 32, bos, False) == docs[0][:32]
    assert ppl.document_window(dataset, 3, 32, bos, True) == docs[3][:32]
    with pytest.raises(ValueError, match="no document has 100 tokens or more .*longest 64"):
        ppl.plan(dataset, 100, 8, prefix)
    with pytest.raises(FileNotFoundError, match="missing"):
        ppl.open_dataset(str(tmp_path / "absent"))
