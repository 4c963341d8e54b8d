import pytest
import torch

from megalong.config import LayoutError, ParallelConfig
from megalong.runtime import init_distributed, read_launch_env
from megalong.runtime.distributed import _first_slurm_host


def test_torchrun_environment():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "node0", 1234, "torchrun")


def test_slurm_environment_picks_first_host_and_a_job_specific_port():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu07"
    other = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                             "SLURM_JOB_ID": "4243"})
    assert other.master_port != env.master_port


@pytest.mark.parametrize("nodelist,first", [("a1", "a1"), ("gpu[01-04]", "gpu01"), ("x[3,5],y2", "x3")])
def test_first_slurm_host_without_scontrol(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _first_slurm_host(nodelist) == first


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_bad_layout_fails_before_any_process_group():
    with pytest.raises(LayoutError, match="world size 4 is not divisible by TP x CP x PP = 3"):
        init_distributed(ParallelConfig(tensor_parallel=3), environ={"RANK": "0", "WORLD_SIZE": "4"})
    assert not torch.distributed.is_initialized()
