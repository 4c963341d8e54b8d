"""Fixtures shared by the training tests.

Starting processes dominates the cost of these tests (imports, process groups), so the
runs that need the same number of processes are batched into one start each and the
tests assert on their results and metrics files.
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
    batch, the uneven run, the 12-step reference run, the padded-vocabulary check, and a
    stage 1 -> stage 2 transition (optimizer carried or fresh)."""
    calls = [
        (helpers.save_initial_weights, (str(workdir / "initial-weights"),)),
        (helpers.first_step_reference, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.reference_run(workdir),)),
        (helpers.padded_vocab_check, ()),
    ] + [(helpers.train_from_dict, (run,)) for run in helpers.stage_runs(workdir)]
    (results,) = run_processes(helpers.in_sequence, 1, (calls,))
    _, first_step, uneven, reference, padded, *stages = results
    return {"first_step": first_step, "uneven_code": uneven, "reference_code": reference,
            "padded": padded, "stage_codes": stages}


@pytest.fixture(scope="session")
def two_process_results(workdir, single_process_results):
    """In two processes: the uneven batch at DP=2; a TP=2 run saving at steps 2 and 4, then
    `latest` pointed back at step 2 and the run continued at PP=2 x 2 virtual stages."""
    tp2, pp2 = helpers.reshard_runs(workdir)
    calls = [
        (helpers.train_from_dict, (helpers.uneven_run(workdir, "uneven-dp2", parallel={"distributed_optimizer": True}),)),
        (helpers.train_from_dict, (tp2,)),
        (helpers.point_latest, (tp2["checkpoint"]["save_dir"], "iter_0000002")),
        (helpers.train_from_dict, (pp2,)),
    ]
    results = run_processes(helpers.in_sequence, 2, (calls,))
    return {"uneven_dp2_codes": [r[0] for r in results], "tp2_codes": [r[1] for r in results],
            "pp2_codes": [r[3] for r in results]}
