"""TrainStream: exact resume, attention-cost balancing over DP ranks, real multi-process use."""

import numpy as np
import pytest

from megalong.data.balance import assign_by_attention_cost, rank_loads, step_time_proxy
from megalong.data.config import DataConfig
from megalong.data.mixture import DomainSpec
from megalong.data.stream import TrainStream
from tests.data.builders import unique_documents, write_indexed

SEQ = 256


def _config(tmp_path, seed=4) -> DataConfig:
    rng = np.random.default_rng(0)
    long_docs = unique_documents(rng.integers(SEQ, 6 * SEQ, size=30))
    short_docs = unique_documents(rng.lognormal(3.5, 1.2, size=400).astype(np.int64) + 1, first_token=10**7)
    write_indexed(tmp_path / "long", long_docs)
    write_indexed(tmp_path / "short", short_docs)
    return DataConfig(
        domains=[DomainSpec(name="long", weight=40, kind="long", paths=["long"]),
                 DomainSpec(name="short", weight=60, kind="concat", paths=["short"])],
        data_root=str(tmp_path), seq_length=SEQ, seed=seed,
    )


def _same(batch_a, batch_b):
    assert len(batch_a) == len(batch_b)
    for a, b in zip(batch_a, batch_b):
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_fresh_stream_at_step_k_gives_the_batch_of_an_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path)
    running = TrainStream(cfg, global_batch_size=8, data_parallel_size=2)
    seen = {}
    for step, batch in zip(range(12), running.iter_batches(0, dp_rank=1)):
        seen[step] = batch
    for k in (0, 5, 11):
        resumed = TrainStream(cfg, global_batch_size=8, data_parallel_size=2)
        _same(resumed.batch_for_step(k, 1), seen[k])
    # The fingerprint a checkpoint keeps: another DP size is the same stream, another global
    # batch size is not (the same step would mean other samples).
    assert TrainStream(cfg, 8, 4).fingerprint() == running.fingerprint()
    assert TrainStream(cfg, 16, 2).fingerprint() != running.fingerprint()
    other = TrainStream(_config(tmp_path, seed=5), 8, 2)
    assert other.fingerprint() != running.fingerprint()
    assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(other.batch_for_step(3, 1), seen[3]))


def test_ranks_split_each_global_batch_exactly(tmp_path):
    stream = TrainStream(_config(tmp_path), global_batch_size=8, data_parallel_size=4)
    for step in (0, 7):
        per_rank = [stream.batch_for_step(step, r) for r in range(4)]
        assert all(len(b) == 2 for b in per_rank)
        got = sorted(tuple(s.tokens[:4].tolist()) for b in per_rank for s in b)
        want = sorted(
            tuple(stream.domains[d].read(layout).tokens[:4].tolist()) for d, layout in stream.layouts_for_step(step)
        )
        assert got == want
        # Heaviest first on every rank; micro-batch j of every rank from neighbours in cost.
        for b in per_rank:
            costs = [s.attention_cost for s in b]
            assert costs == sorted(costs, reverse=True)
    with pytest.raises(ValueError, match="multiple of the data-parallel size"):
        TrainStream(_config(tmp_path), global_batch_size=6, data_parallel_size=4)


def test_snake_assignment_balances_attention_cost():
    rng = np.random.default_rng(0)
    worst_naive, worst_snake = [], []
    for _ in range(50):
        # A 64K-style batch: a few one-document samples (cost S^2) among many short-document ones.
        costs = np.where(rng.random(64) < 0.3, 65536.0**2, rng.uniform(0.01, 0.2, 64) * 65536.0**2)
        snake = assign_by_attention_cost(costs, 8)
        naive = [list(range(r * 8, (r + 1) * 8)) for r in range(8)]
        assert sorted(i for idx in snake for i in idx) == list(range(64))
        for assignment, worst in ((naive, worst_naive), (snake, worst_snake)):
            loads = rank_loads(costs, assignment)
            worst.append(loads.max() / loads.mean())
        assert step_time_proxy(costs, snake) <= step_time_proxy(costs, naive)
    # Whole samples cannot be split, so some imbalance is inherent (19 heavy samples over 8 ranks).
    assert np.mean(worst_snake) < 1.2 and np.mean(worst_naive) > 1.4
    assert assign_by_attention_cost([5, 1, 3, 9], 2) == [[3, 1], [0, 2]]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        assign_by_attention_cost([1, 2, 3], 2)


def _rank_batches(cfg_dict, steps):
    """Runs in a spawned process: each DP rank builds its own stream, as trainers do."""
    import torch.distributed as dist

    from megalong.config import ParallelConfig, from_dict
    from megalong.data.config import DataConfig
    from megalong.data.stream import TrainStream
    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(), device="cpu")
    cfg = from_dict(DataConfig, cfg_dict)
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = TrainStream(cfg, global_batch_size=4, data_parallel_size=world)
    out = []
    for step in steps:
        batch = stream.batch_for_step(step, rank)
        local = sum(float(s.loss_mask.sum()) for s in batch)
        import torch

        total = torch.tensor([local])
        dist.all_reduce(total)  # what the trainer's token-averaged loss divides by
        out.append(([s.tokens.tolist() for s in batch], float(total)))
    return out


def test_real_processes_see_disjoint_halves_of_the_same_global_batch(tmp_path):
    from megalong.config import to_dict
    from megalong.runtime.launch import run_processes

    cfg = _config(tmp_path)
    steps = [0, 9]
    results = run_processes(_rank_batches, 2, (to_dict(cfg), steps))
    reference = TrainStream(cfg, global_batch_size=4, data_parallel_size=2)
    for i, step in enumerate(steps):
        for rank in range(2):
            want = [s.tokens.tolist() for s in reference.batch_for_step(step, rank)]
            assert results[rank][i][0] == want
        total = sum(float(s.loss_mask.sum()) for r in range(2) for s in reference.batch_for_step(step, r))
        assert results[0][i][1] == results[1][i][1] == total
