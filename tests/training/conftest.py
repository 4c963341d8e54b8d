"""Fixtures shared by the training tests.

Starting processes dominates the cost of these tests (imports, process groups), so the
runs that need the same number of processes are batched into one start each and the
tests assert on their results.
"""

import pytest

from megalong.runtime.launch import run_processes
from tests.training import helpers


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="session")
def single_process_results(workdir):
    """In one process: initial weights, the hand-computed first-step loss of the uneven
    batch, the uneven run, the 12-step reference run, and the padded-vocabulary check."""
    (results,) = run_processes(helpers.in_sequence, 1, ([
        (helpers.save_initial_weights, (str(workdir / "initial-weights"),)),
        (helpers.first_step_reference, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.reference_run(workdir),)),
        (helpers.padded_vocab_check, ()),
    ],))
    _, reference, uneven_code, reference_code, padded = results
    return {"first_step": reference, "uneven_code": uneven_code, "reference_code": reference_code,
            "padded": padded}


@pytest.fixture(scope="session")
def initial_weights(workdir, single_process_results):
    """Freshly initialized test-tiny weights (a weights directory) shared by the runs."""
    return workdir / "initial-weights"
