"""Run a function in N real processes on this machine, as torchrun would.

Used by the tests (real multi-process gloo runs) and by single-machine tools such as
the quickstart. Each process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
like under torchrun; the function's return value on every rank is handed back.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn, world_size: int, port: int, args, env, result_dir: str, log_level: int) -> None:
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        # Two cores shared by all ranks: one thread each keeps gloo runs from thrashing.
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    os.environ.update(env or {})
    from megalong.runtime.logs import setup_logging
    from megalong.runtime.warnings_filter import quiet_known_warnings

    quiet_known_warnings()
    setup_logging(log_level)  # the parent's level; INFO from rank 0 only, tagged warnings
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        result = fn(*args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megalong.runtime import shutdown

            shutdown()
    with open(Path(result_dir) / f"rank{local_rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_processes(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned processes; return each rank's result.

    ``fn`` must be importable (a module-level function). An exception on any rank is
    re-raised here with that rank's traceback. The processes log at this process's level
    (rank 0's INFO lines, every rank's warnings: see :mod:`megalong.runtime.logs`).
    With ``timeout_s``, processes still running after that many seconds (a collective that
    never completes waits for NCCL's 30-minute timeout) are killed and TimeoutError is raised.
    """
    with tempfile.TemporaryDirectory(prefix="megalong-procs-") as result_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), tuple(args), dict(env or {}), result_dir,
                  logging.getLogger().getEffectiveLevel()),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not context.join(timeout=None if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout_s:g} s "
                                   f"on {world_size} process(es); they were stopped")
        results = []
        for rank in range(world_size):
            with open(Path(result_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results
