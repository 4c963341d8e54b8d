"""The report's figures come from the files and its words from the figures."""

import json

import pytest

from megalong.eval.perplexity import PositionBuckets
from megalong.quickstart import report


def _buckets(losses_by_position: list[float], bucket: int) -> list[dict]:
    """Buckets as `megalong eval` writes them, for one document with these token losses."""
    positions = PositionBuckets(len(losses_by_position) + 1, bucket)
    import numpy as np

    positions.add(positions.split(0, np.asarray(losses_by_position)))
    return positions.summary()["buckets"]


def test_position_bands_are_token_weighted_means_of_exact_bands():
    # Losses of positions 1..15: 1.0 up to position 7, then 3.0; boundary 8, buckets of 4.
    losses = [1.0] * 7 + [3.0] * 8
    bands = report.position_bands(_buckets(losses, 4), 8)
    # Bucket 0 holds positions 1-3 only (position 0 has no loss): the means weigh by tokens.
    assert bands == {"within": pytest.approx(1.0), "beyond": pytest.approx(3.0)}
    with pytest.raises(ValueError, match="falls inside a bucket"):
        report.position_bands(_buckets(losses, 3), 8)


@pytest.mark.parametrize("stage2_beyond, verdict", [
    (4.0, "Its gain is larger past the length stage 1 was trained at"),
    (4.9, "Its gain is smaller past stage 1's length than within it"),
    (4.5, "Its gain is the same past stage 1's length as within it"),
])
def test_the_sentence_says_what_the_bands_show(stage2_beyond, verdict):
    # Stage 2 lowers the loss by 0.5 within stage 1's length.
    bands = {"stage1": {"within": 5.0, "beyond": 5.0}, "stage2": {"within": 4.5, "beyond": stage2_beyond}}
    text = "\n".join(report._loss_words(bands, 256, 1024))
    assert f"by {stage2_beyond - 5.0:+.2f} beyond stage 1's length (positions 256-1023) and by -0.50 within it" in text
    assert verdict in text
    assert "stage1: loss beyond 256 is not lower than within (5.00 vs 5.00)" in text


def _row(label: str, by_length: dict, prediction: str) -> dict:
    sample = {"task": "kv_lookup", "length": 256, "depth": 0.5, "answers": ["417"], "prediction": prediction}
    return {"label": label, "recall": {"summary": {"by_length": by_length}, "samples": [sample]}}


def test_recall_words_compare_with_copying_a_random_key():
    text = "\n".join(report._recall_words([
        _row("stage1", {"niah_single": {"256": 0.0}, "kv_lookup": {"256": 0.5, "1024": 0.0}}, "417."),
        _row("stage2", {"kv_lookup": {"256": 0.0, "1024": 0.0}}, "::"),
        {"label": "no-recall", "recall": None},
    ]))
    assert "stage1: kv_lookup 0.50 at 256, 0.00 at 1024 tokens; best above the 0.03" in text
    assert "stage2: kv_lookup 0.00 at 256, 0.00 at 1024 tokens; best no better than the 0.03" in text
    assert "Its first answer (256 tokens, depth 0.5): '::' for '417'." in text
    assert "no-recall" not in text


def test_throughput_counts_each_step_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [(1, 2.0, 100.0), (2, 1.0, 300.0), (2, 2.0, 200.0), (3, 1.0, 200.0)]  # step 2 rerun after a resume
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, "step_time_s": t, "tokens_per_s": r,
                                           "tokens": round(t * r)}) + "\n" for s, t, r in records))
    assert report.throughput(report.read_metrics(metrics)) == {"steps": 3, "tokens": 800, "step_seconds": 5.0, "tokens_per_s": 160.0}


def test_sizes_count_files_not_what_links_point_to(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 1000)
    (tmp_path / "a" / "y.txt").write_bytes(b"0" * 24)
    (tmp_path / "big").write_bytes(b"0" * 10**6)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "big")
    assert report.size_bytes(tmp_path / "a") == 1024
    assert report.size_bytes(tmp_path / "big") == 10**6
    assert report.size_bytes(tmp_path / "missing") == 0
