"""The console drops Megatron-Core's notices addressed to its callers' code, and nothing else."""

import logging

import pytest

from megalong.runtime.logs import setup_logging


@pytest.fixture
def console(capfd):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    setup_logging("INFO", environ={})
    yield lambda: capfd.readouterr().err
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_megatron_core_notices_for_its_callers_are_dropped(console):
    megatron = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    megatron.warning("MCore's async save is deprecated and will be removed in the future releases. "
                     "Please, use NVRx async solution by setting `async_strategy` to `nvrx`.")
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. Use HybridModel")
    rerun = logging.getLogger("megatron.core.rerun_state_machine")
    rerun.warning("Implicit initialization of Rerun State Machine!")
    rerun.warning("RerunStateMachine initialized in mode RerunMode.DISABLED")
    megatron.warning("Overwriting old incomplete / corrupted checkpoint...")  # a real one stays
    logging.getLogger("megalong.x").warning("GPTModel IS DEPRECATED (megalong's own lines are never dropped)")
    err = console()
    assert "async save is deprecated" not in err and "HybridModel" not in err and "Rerun" not in err
    assert "Overwriting old incomplete" in err and "megalong's own lines are never dropped" in err
