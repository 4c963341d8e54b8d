"""The attention work of a recipe's samples and the imbalance it causes, against brute force."""

import numpy as np
import pytest
import torch

from megalong.data.config import DataConfig
from megalong.data.cp_shard import load_balanced_index
from megalong.data.balance import assign_by_attention_cost
from megalong.data.mixture import DomainSpec
from megalong.model.attention.thd_relayout import thd_index
from megalong.plan.workload import Workload, cp_rank_work


def _doc_start_of_each_position(segments):
    return np.repeat(np.concatenate([[0], np.cumsum(segments)[:-1]]), segments)


def _brute_whole_sequence(segments, cp):
    """Keys each CP rank's queries attend, position by position, in Megatron's whole-sequence layout."""
    start = _doc_start_of_each_position(segments)
    out = []
    for rank in range(cp):
        positions = load_balanced_index(int(sum(segments)), cp, rank).numpy()
        out.append(float((positions - start[positions] + 1).sum()))
    return np.array(out)


def _brute_per_document(segments, cp):
    """The same in Transformer Engine's THD layout (megalong's thd_index), padding doing no work."""
    segments = np.asarray(segments)
    padded = -(-segments // (2 * cp)) * (2 * cp)
    cu_padded = torch.tensor(np.concatenate([[0], np.cumsum(padded)]))
    pad_start = np.repeat(cu_padded[:-1].numpy(), padded)
    real = np.repeat(segments, padded)
    out = []
    for rank in range(cp):
        positions = thd_index(cu_padded, cp, rank).numpy()
        offset = positions - pad_start[positions]
        out.append(float(np.where(offset < real[positions], offset + 1, 0).sum()))
    return np.array(out)


@pytest.mark.parametrize("segments", [[96], [7, 40, 1, 20, 28], [13, 13, 13, 13, 13, 13, 18]])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_rank_work_matches_position_by_position_counts(segments, cp):
    segments = [s for s in segments]
    total = sum(segments)
    if total % (2 * cp):
        segments[-1] += 2 * cp - total % (2 * cp)
    assert np.array_equal(cp_rank_work(np.array(segments), cp, per_document=False), _brute_whole_sequence(segments, cp))
    assert np.array_equal(cp_rank_work(np.array(segments), cp, per_document=True), _brute_per_document(segments, cp))


def test_cp_inflation():
    full = Workload.full_sequences(4096, 2)
    assert full.cp_inflation(8, per_document=True) == 1.0 == full.cp_inflation(8, per_document=False)
    packed = Workload(4096, 2, [[np.array([3000, 96, 1000]), np.array([4096])]], "test")
    work = [cp_rank_work(s, 4, False) for s in (np.array([3000, 96, 1000]), np.array([4096]))]
    expected = sum(w.max() for w in work) / sum(w.mean() for w in work)
    assert packed.cp_inflation(4, per_document=False) == pytest.approx(expected) and expected > 1.01
    assert 1.0 <= packed.cp_inflation(4, per_document=True) < expected


def test_dp_inflation_is_the_heaviest_rank_under_megalongs_balancing():
    rng = np.random.default_rng(0)
    steps = [[np.array([int(n)]) for n in rng.integers(500, 8192, size=8)] for _ in range(3)]
    workload = Workload(8192, 8, steps, "test")
    assert Workload.full_sequences(8192, 8).dp_inflation(4, 0.7) == 1.0
    f = 0.6
    heaviest = ideal = 0.0
    for step in steps:
        costs = np.array([float(s[0]) ** 2 for s in step])
        times = (1 - f) + f * costs / workload.mean_attention_cost
        loads = [times[idx].sum() for idx in assign_by_attention_cost(costs, 4)]
        heaviest, ideal = heaviest + max(loads), ideal + np.mean(loads)
    assert workload.dp_inflation(4, f) == pytest.approx(heaviest / ideal) and heaviest / ideal > 1.0
    assert workload.dp_inflation(1, f) == 1.0


def test_stand_in_samples_keep_the_long_domains_exact():
    # ProLong stage 2: 20% of samples are single 512K documents, 40% eight 64K documents; the
    # rest short documents. Attention work is therefore at least 0.2 + 0.4 / 8 = 25% of
    # full-length attention, plus the short documents' (a few % at most).
    data = DataConfig(mixture="prolong_stage2_512k", seq_length=524288, data_root="/nonexistent")
    workload = Workload.from_data(data, 16)
    samples = [s for step in workload.steps for s in step]
    whole = sum(1 for s in samples if s.tolist() == [524288])
    chunks = sum(1 for s in samples if s.tolist() == [65536] * 8)
    assert whole / len(samples) == pytest.approx(0.20, abs=1 / 16) and chunks / len(samples) == pytest.approx(0.40,
                                                                                                              abs=1 / 16)
    assert all(int(s.sum()) == 524288 for s in samples)
    assert 0.25 <= workload.attention_fraction_of_full <= 0.30
    assert "stand-in" in workload.source


def test_real_datasets_give_the_training_streams_samples(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megalong.data.stream import TrainStream

    rng = np.random.default_rng(1)
    for name, lengths in (("long", [300, 700, 520]), ("short", rng.integers(5, 60, size=200))):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.int32)
        for n in lengths:
            builder.add_document(np.arange(int(n), dtype=np.int32), [int(n)])
        builder.finalize(str(tmp_path / f"{name}.idx"))
    data = DataConfig(domains=[DomainSpec("long", 1, ["long"], kind="long"),
                               DomainSpec("short", 1, ["short"], kind="concat")],
                      data_root=str(tmp_path), seq_length=256, seed=3)
    workload = Workload.from_data(data, 4, samples=8)
    stream = TrainStream(data, 4, 1)
    expected = [[layout.segment_lengths.tolist() for _, layout in stream.layouts_for_step(step)] for step in (0, 1)]
    assert [[s.tolist() for s in step] for step in workload.steps] == expected
    assert "datasets" in workload.source
