"""Run inside spawned processes by test_seeds.py."""

import torch


def draws(tensor_parallel: int):
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    from megalong.config import ParallelConfig
    from megalong.runtime import init_distributed, set_seed

    init_distributed(ParallelConfig(tensor_parallel=tensor_parallel))
    set_seed(7)
    shared = torch.rand(4)  # default stream: the same on every rank
    with mcore_tp.get_cuda_rng_tracker().fork():
        per_tp_rank = torch.rand(4)  # model-parallel stream: differs across TP ranks
    after = torch.rand(4)  # forking must not disturb the default stream
    set_seed(7)
    replay_shared = torch.rand(4)
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "shared": shared, "per_tp_rank": per_tp_rank, "after": after, "replay_shared": replay_shared,
    }
