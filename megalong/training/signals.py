"""Cluster life: turn SIGTERM/SIGUSR1 and a time limit into "save, then exit for requeue".

A signal handler only sets a flag; the training loop asks :meth:`StopWatch.should_stop`
after every step. That question is a collective (a max all-reduce of one number), so
every rank stops at the same step even when the signal reached only some of them, and
the checkpoint that follows is consistent.
"""

from __future__ import annotations

import logging
import signal
import time

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
