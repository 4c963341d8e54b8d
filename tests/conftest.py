"""Shared pytest setup."""

import os

# Every test process (and the processes tests spawn) uses one thread per process:
# the machines running the suite have two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
