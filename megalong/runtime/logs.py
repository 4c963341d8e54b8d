"""Console logging for one process of a job: rank 0 speaks for the job, the others warn.

Under torchrun or srun every process runs the same code, so every INFO line would be
printed once per rank. Rank 0's INFO lines are the job's account; on other ranks only
warnings and errors are shown, and those are the lines that can differ between ranks, so
in a multi-process job every warning and error starts with its rank (``[rank 3]``).
Set ``MEGALONG_LOG_ALL_RANKS=1`` to see every rank's lines, each tagged, when debugging.

The rank is read from the launcher's environment (as :func:`megalong.runtime.read_launch_env`
does), so logging is right before torch.distributed starts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

from megalong.runtime.warnings_filter import KnownLogNoise

ALL_RANKS_ENV = "MEGALONG_LOG_ALL_RANKS"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


def launch_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process from torchrun's or SLURM's variables, else (0, 1).

    The same precedence as ``read_launch_env``, without its side effects (it may ask
    ``scontrol`` for the first host).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


class _RankFormatter(logging.Formatter):
    """Starts a line with ``[rank N]`` when it may differ between ranks."""

    def __init__(self, rank: int, tag_every_line: bool):
        super().__init__(FORMAT, DATE_FORMAT)
        self.rank = rank
        self.tag_every_line = tag_every_line

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.tag_every_line or record.levelno >= logging.WARNING:
            return f"[rank {self.rank}] {text}"
        return text


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line (as ``logging.lastResort`` does), so a
    stream swapped later (a test capturing output) is followed rather than written after close."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def setup_logging(level: int | str = logging.INFO, environ: Mapping[str, str] | None = None) -> None:
    """Send this process's log lines to stderr, once per job (see the module docstring).

    Called once per process (the ``megalong`` command, processes spawned by
    :func:`megalong.runtime.launch.run_processes`); calling it again replaces its handler.
    Python warnings go through logging too, so they carry the rank as well.
    """
    env = os.environ if environ is None else environ
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    rank, world_size = launch_rank(env)
    all_ranks = env.get(ALL_RANKS_ENV, "").strip().lower() not in ("", "0", "false", "no")

    handler = _ConsoleHandler()
    if world_size > 1:
        handler.setFormatter(_RankFormatter(rank, tag_every_line=all_ranks))
    else:
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    if rank != 0 and not all_ranks:
        handler.setLevel(max(level, logging.WARNING))
    handler.addFilter(KnownLogNoise())

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Megatron-Core logs its internals at INFO (bucket layouts, whole configs, import-time
    # choices): the console keeps to megalong's own account of the job unless debugging.
    logging.getLogger("megatron").setLevel(level if level <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)
