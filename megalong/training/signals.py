"""Cluster life: turn SIGTERM/SIGUSR1 and a time limit into "save, then exit for requeue".

A signal handler only sets a flag; the training loop asks :meth:`StopWatch.should_stop`
after every step. That question is a collective (a max all-reduce of one number), so
every rank stops at the same step even when the signal reached only some of them, and
the checkpoint that follows is consistent.

SLURM sends its signals to every process of a job step, helper processes included: a
checkpoint save runs inside :func:`stop_signals_deferred` so that the helpers it starts
survive them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from multiprocessing import resource_tracker

import torch

log = logging.getLogger(__name__)

# Exit status meaning "checkpoint saved, please requeue me" (the SLURM templates requeue on it).
REQUEUE_EXIT_CODE = 3

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopWatch:
    """Watches for stop signals and the run's time limit."""

    def __init__(self, exit_duration_minutes: float = 0.0, device: torch.device | None = None):
        self.start_time = time.monotonic()
        self.exit_duration_s = float(exit_duration_minutes) * 60.0
        self.received: str | None = None
        self.device = device or torch.device("cpu")
        self._previous = {}

    def install(self) -> "StopWatch":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def _local_reason(self) -> int:
        if self.received is not None:
            return 2
        if self.exit_duration_s and time.monotonic() - self.start_time >= self.exit_duration_s:
            return 1
        return 0

    def should_stop(self) -> str | None:
        """Collective: the reason to stop now (same answer on every rank), or None."""
        reason = torch.tensor([self._local_reason()], dtype=torch.int32, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(reason, op=torch.distributed.ReduceOp.MAX)
        value = int(reason.item())
        if value == 2:
            return f"received {self.received or 'a stop signal (on another rank)'}"
        if value == 1:
            return f"time limit of {self.exit_duration_s / 60:g} minutes reached (--exit-duration-minutes)"
        return None


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold SIGTERM/SIGUSR1 back from this thread while the block runs (a checkpoint save).

    Processes started inside the block inherit the block and never see these signals:
    Megatron-Core's checkpoint writers and the manager process it spawns for their results
    would otherwise die of a signal sent to the whole job step (a preemption, SLURM's
    time-limit warning), and every later save would fail. This process still gets them,
    at the latest when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Starting multiprocessing's resource tracker (done on the first spawn) unblocks
        # SIGTERM on its way out: start it here, then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
