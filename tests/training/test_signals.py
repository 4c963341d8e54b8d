"""Stop signals around checkpoint saves: the helper processes a save starts survive them."""

import multiprocessing
import os
import signal
import time

from megalong.training.signals import StopWatch, stop_signals_deferred


def test_processes_started_during_a_save_survive_stop_signals_and_none_is_lost():
    # What Megatron-Core's first checkpoint save does: spawn a manager process for the
    # writers' results. SLURM then signals every process of the job (preemption, warning).
    stop = StopWatch().install()
    try:
        with stop_signals_deferred():
            manager = multiprocessing.get_context("spawn").Manager()
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives during the save: not lost
        assert stop.received == "SIGUSR1"
        results = manager.Queue()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(manager._process.pid, sig)
        time.sleep(0.5)
        results.put("written")  # a dead manager raises here (the failed save of a preempted job)
        assert results.get() == "written"
        manager.shutdown()
    finally:
        stop.uninstall()
