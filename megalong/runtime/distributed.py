"""Start torch.distributed and Megatron-Core's parallel state from a launcher's environment.

Understands torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST) and a
plain single process. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import subprocess
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch

from megalong.config.parallel import ParallelConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    ranks_on_node: Optional[int] = None  # processes on this node, when the launcher says


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[01-04,07],cpu1``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    match = re.match(r"([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _ranks_on_node(env: Mapping[str, str]) -> Optional[int]:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):  # torchrun, srun
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    launch = _launch_env(env)
    return replace(launch, ranks_on_node=_ranks_on_node(env))


def _launch_env(env: Mapping[str, str]) -> LaunchEnv:
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # One port per job so two jobs on one node never collide.
            master_port=int(env.get("MASTER_PORT") or (DEFAULT_PORT + 1 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT", 0) or 0), "single")


@dataclass(frozen=True)
class Runtime:
    """The started distributed runtime of this process."""

    launch: LaunchEnv
    parallel: ParallelConfig
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.data_parallel_size(self.world_size)


def set_cuda_device_max_connections(parallel: ParallelConfig, environ=None) -> None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` when the layout overlaps communication with compute.

    With one hardware queue, kernels start in the order they are issued, which is what
    Megatron-Core's tensor-parallel linears (their gradient all-reduce or sequence-parallel
    reduce-scatter) and context-parallel attention count on to overlap communication with
    the next computation; without it they still compute correctly but lose the overlap. CUDA
    reads the variable when the context is created, so this runs before anything touches the
    GPU (on the CPU it changes nothing). A value the user set is kept, with a warning.
    """
    env = os.environ if environ is None else environ
    if parallel.tensor_parallel == 1 and parallel.context_parallel == 1:
        return
    current = env.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    elif current != "1":
        log.warning("CUDA_DEVICE_MAX_CONNECTIONS=%s: tensor/context parallelism overlaps communication "
                    "only with 1; keeping your value", current)
    if torch.cuda.is_initialized() and current is None:
        log.warning("CUDA was initialised before CUDA_DEVICE_MAX_CONNECTIONS could be set: set it to 1 "
                    "before starting Python to keep tensor/context-parallel communication overlapped")


def resolve_device(requested: str) -> str:
    """``runtime.device`` as this process will run it: "auto" is the GPU when one is visible."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda was asked for but no GPU is visible")
    return requested


def check_ranks_fit_gpus(local_rank: int, ranks_on_node: Optional[int], gpus: int) -> None:
    """One GPU per process: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so
    say so before any process group exists."""
    needed = max(local_rank + 1, ranks_on_node or 0)
    if needed > gpus:
        found = f"{ranks_on_node} processes on this node" if ranks_on_node else f"a process with local rank {local_rank}"
        raise RuntimeError(
            f"{found} but {gpus} GPU(s) visible: megalong runs one process per GPU (NCCL refuses two "
            f"processes on one GPU); start {gpus} process(es) per node (torchrun --nproc-per-node={gpus}, "
            f"srun --ntasks-per-node={gpus}) or make more GPUs visible"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    parallel: ParallelConfig,
    *,
    device: str = "auto",
    timeout_minutes: int = 30,
    environ: Mapping[str, str] | None = None,
) -> Runtime:
    """Start torch.distributed and Megatron-Core's parallel groups for ``parallel``.

    The layout is validated first, so a bad layout fails before any process group exists.
    """
    launch = read_launch_env(environ)
    parallel.validate(launch.world_size)

    device = resolve_device(device)
    if device == "cuda":
        check_ranks_fit_gpus(launch.local_rank, launch.ranks_on_node, torch.cuda.device_count())
        torch.cuda.set_device(launch.local_rank)
        torch_device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        from megalong.runtime import cpu_compat

        cpu_compat.enable()
        torch_device = torch.device("cpu")
        backend = "gloo"

    if not torch.distributed.is_initialized():
        port = launch.master_port or _free_port()
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    runtime = Runtime(launch=launch, parallel=parallel, device=torch_device, backend=backend)
    if launch.rank == 0:
        log.info(
            "Distributed runtime up (%s launcher, %s backend): %s",
            launch.launcher, backend, parallel.describe(launch.world_size),
        )
    return runtime


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron-Core's model-parallel RNG tracker.

    The tracker gives each tensor-parallel rank its own stream for TP-local randomness
    (dropout inside TP regions) and works on CPU through the compatibility layer.
    """
    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_zero_only_log(message: str, *args, level: int = logging.INFO, logger: Optional[logging.Logger] = None):
    """Log once per job rather than once per process."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        (logger or log).log(level, message, *args)
