"""Run inside spawned processes by test_logs.py: what every rank of a job would log."""

import logging
import os
import warnings

log = logging.getLogger("megalong.test_logs")


def speak() -> None:
    rank = int(os.environ["RANK"])
    log.info("the job starts")  # every rank says it: a person needs it once
    log.info("details of rank %d", rank)
    if rank == 1:
        log.warning("rank 1 sees something odd")
        warnings.warn("a library warns on rank 1")
