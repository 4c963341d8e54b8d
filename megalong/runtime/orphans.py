"""Processes that must not outlive the training process that started them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Set by `python -m megalong` in its own environment, so that the children it starts know their
# parent's pid even when it died before they ran (multiprocessing tells spawned children only
# later, after importing the main module).
PARENT_PID_VARIABLE = "MEGALONG_MAIN_PID"


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; a no-op elsewhere).

    Megatron-Core's checkpoint writers run in child processes (multiprocessing, spawn). When
    the training process is killed with SIGKILL (a crash, the OOM killer, ``kill -9``) such a
    child waits forever on a queue nobody reads, holding its memory (seen: 270 MB each).
    """
    if not sys.platform.startswith("linux"):
        return
    parent = int(os.environ.get(PARENT_PID_VARIABLE) or os.getppid())
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
