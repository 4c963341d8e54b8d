"""Distributed runtime: launcher environment, process groups, seeds, CPU compatibility."""

from megalong.runtime.distributed import (
    LaunchEnv,
    Runtime,
    init_distributed,
    read_launch_env,
    set_seed,
    shutdown,
)

__all__ = ["LaunchEnv", "Runtime", "init_distributed", "read_launch_env", "set_seed", "shutdown"]
