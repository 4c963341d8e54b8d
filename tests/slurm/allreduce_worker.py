"""Run by each srun task of the all-reduce job: rank and rendezvous come from SLURM's environment."""

import sys

import torch
import torch.distributed as dist

from megalong.runtime.distributed import read_launch_env

if __name__ == "__main__":
    launch = read_launch_env()
    dist.init_process_group("gloo", init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size)
    value = torch.tensor([float(launch.rank + 1)])
    dist.all_reduce(value)
    with open(f"{sys.argv[1]}/rank{launch.rank}.txt", "w") as f:
        f.write(f"{launch.launcher} {launch.rank} {launch.world_size} {launch.master_port} {value.item():g}\n")
    dist.destroy_process_group()
