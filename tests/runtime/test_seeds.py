import torch

from megalong.runtime.launch import run_processes
from tests.runtime import rng_workers


def test_model_parallel_rng_tracker_on_cpu():
    a, b = run_processes(rng_workers.draws, 2, (2,))
    assert {a["tp_rank"], b["tp_rank"]} == {0, 1}
    assert torch.equal(a["shared"], b["shared"])
    assert not torch.equal(a["per_tp_rank"], b["per_tp_rank"])
    assert torch.equal(a["after"], b["after"])
    assert torch.equal(a["shared"], a["replay_shared"])
    assert not torch.equal(a["shared"], a["after"])
