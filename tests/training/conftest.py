"""Fixtures shared by the training tests.

Starting processes dominates the cost of these tests (imports, process groups), so the
runs that need the same number of processes are batched into one start each and the
tests assert on their results and metrics files. Resumed runs come in a later start than
the checkpoints they resume from: one process, then two, then eight, then one again.
"""

import pytest

from megalong.runtime.launch import run_processes
from tests.training import bf16, broken, helpers, real_data, reshard
from tests.training import sequence_parallel as sp


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


def in_one_start(processes: int, *groups: list) -> list:
    """Run the groups of (function, args) calls one after the other in one start of
    ``processes`` processes; per group, each rank's results (a list per rank)."""
    per_rank = run_processes(helpers.in_sequence, processes, ([call for group in groups for call in group],))
    found, start = [], 0
    for group in groups:
        found.append([rank[start:start + len(group)] for rank in per_rank])
        start += len(group)
    return found


def by_name(named_calls: dict, results: list) -> dict:
    """Call name -> each rank's result, for a group run by :func:`in_one_start`."""
    return {name: [rank[index] for rank in results] for index, name in enumerate(named_calls)}


@pytest.fixture(scope="session")
def single_process_results(workdir):
    """In one process: initial weights, the hand-computed first-step loss of the uneven
    batch, the uneven run, the 12-step reference run, the padded-vocabulary check, and a
    stage 1 -> stage 2 transition (optimizer carried or fresh); the resharding matrix's
    one-process run; the real datasets (``megalong preprocess`` and ``sft-data``) and
    uninterrupted runs on them (a long + concat mixture, and SFT); the bf16 runs of one process
    (tests/training/bf16.py), from a Hugging Face model converted here first; the first
    sequence-parallel runs of one process (tests/training/sequence_parallel.py)."""
    data = workdir / "real-data"
    bf16.prepare_initial_weights(workdir)
    calls = [
        (helpers.save_initial_weights, (str(workdir / "initial-weights"),)),
        (helpers.first_step_reference, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.uneven_run(workdir, "uneven-single"),)),
        (helpers.train_from_dict, (helpers.reference_run(workdir),)),
        (helpers.padded_vocab_check, ()),
    ] + [(helpers.train_from_dict, (run,)) for run in helpers.stage_runs(workdir)]
    calls += reshard.calls(workdir, 1, "first") + [
        (real_data.build, (str(data),)),
        (helpers.train_from_dict, (real_data.mixture_run(data, workdir / "mixture"),)),
        (helpers.train_from_dict, (real_data.sft_run(data, workdir / "sft"),)),
    ]
    sp_calls = sp.calls(sp.workdir_of(workdir), 1, "first")
    (results,), (bf16_codes,), sp_results = in_one_start(1, calls, bf16.calls(workdir, 1, "first"),
                                                         list(sp_calls.values()))
    _, first_step, uneven, reference, padded, *stages, matrix, data_build, mixture, sft = results
    return {"first_step": first_step, "uneven_code": uneven, "reference_code": reference,
            "padded": padded, "stage_codes": stages, "matrix_code": matrix, "data_build_codes": data_build,
            "mixture_code": mixture, "sft_code": sft, "bf16_codes": bf16_codes,
            "sp": by_name(sp_calls, sp_results)}


def mixture_at_dp2(workdir) -> dict:
    """The real-data mixture at DP=2, saving at step 4 (resumed at DP=1 later)."""
    save = {"save_dir": str(workdir / "mixture-dp2" / "ckpt"), "save_interval": 4, "keep_last": 0}
    return real_data.mixture_run(workdir / "real-data", workdir / "mixture-dp2", checkpoint=save,
                                 parallel={"distributed_optimizer": True})


def on_a_copy(workdir, layout: str, name: str, **sections) -> dict:
    """The matrix's run at ``layout`` again, saving into ``name``/ckpt, where the tests put a
    copy of one of its checkpoints (broken.copy_checkpoint) to resume from."""
    return helpers.merge(reshard.uninterrupted(workdir, layout), helpers.merge({
        "checkpoint": {"save_dir": str(workdir / name / "ckpt")},
        "logging": {"metrics_file": str(workdir / name / "m.jsonl")}}, sections))


@pytest.fixture(scope="session")
def two_process_results(workdir, single_process_results):
    """In two processes: the uneven batch at DP=2; a TP=2 run saving at steps 2 and 4, then
    `latest` pointed back at step 2 and the run continued at PP=2 x 2 virtual stages; the
    resharding matrix's two-process runs, then its resumes from one process; the real-data
    mixture at DP=2; a save that fails on rank 0 (file-size limit), rank 1 having none; the bf16
    runs of two processes (tests/training/bf16.py), resumes from one process among them; the
    sequence-parallel runs of two processes."""
    tp2, pp2 = helpers.reshard_runs(workdir)
    calls = [
        (helpers.train_from_dict, (helpers.uneven_run(workdir, "uneven-dp2", parallel={"distributed_optimizer": True}),)),
        (helpers.train_from_dict, (tp2,)),
        (helpers.point_latest, (tp2["checkpoint"]["save_dir"], "iter_0000002")),
        (helpers.train_from_dict, (pp2,)),
    ]
    matrix = reshard.calls(workdir, 2, "first") + reshard.calls(workdir, 2, "resume")
    calls += matrix + [
        (helpers.train_from_dict, (mixture_at_dp2(workdir),)),
        (broken.copy_checkpoint, (str(reshard.checkpoints(workdir, "dp2")), str(workdir / "disk-full" / "ckpt"),
                                  "iter_0000003")),
        (broken.train_catching, (on_a_copy(workdir, "dp2", "disk-full"), broken.FILE_SIZE_LIMIT, 0)),
    ]
    # Before the full-disk run: checkpoint saves in a process after it fail (see
    # resumed_single_process_results).
    sp_calls = sp.calls(sp.workdir_of(workdir), 2, "first")
    bf16_codes, sp_results, results = in_one_start(
        2, bf16.calls(workdir, 2, "first") + bf16.calls(workdir, 2, "resume"), list(sp_calls.values()), calls)
    return {"bf16_codes": bf16_codes, "uneven_dp2_codes": [r[0] for r in results], "tp2_codes": [r[1] for r in results],
            "pp2_codes": [r[3] for r in results], "matrix_codes": [r[4:4 + len(matrix)] for r in results],
            "mixture_dp2_codes": [r[-3] for r in results], "disk_full": [r[-1] for r in results],
            "sp": by_name(sp_calls, sp_results)}


@pytest.fixture(scope="session")
def eight_process_results(workdir, single_process_results):
    """In eight processes: the 12-step reference run at TP=2 x PP=2 x CP=2, saving at step 6 for a
    resume in one process; then the bf16 zero-lr step from converted weights at that layout.
    Each rank's exit codes, in that order."""
    save = {"save_dir": str(workdir / "eight-processes" / "ckpt"), "save_interval": 6, "keep_last": 0,
            "optimizer_format": "fully_reshardable"}  # resumed at another layout
    run = helpers.reference_run(workdir, "eight-processes", parallel=helpers.EIGHT_PROCESS_LAYOUT, checkpoint=save)
    calls = [(helpers.train_from_dict, (run,))] + bf16.calls(workdir, 8, "first")
    return run_processes(helpers.in_sequence, 8, (calls,))


@pytest.fixture(scope="session")
def four_process_sp_results(workdir, two_process_results):
    """In four processes: the sequence-parallel runs at TP=2 x CP=2 (call name -> each rank's result)."""
    calls = sp.calls(sp.workdir_of(workdir), 4, "first")
    (results,) = in_one_start(4, list(calls.values()))
    return by_name(calls, results)


def eight_to_one(workdir, name: str) -> dict:
    """The reference run in one process, resumed from the eight-process run's step 6."""
    resume = str(workdir / "eight-processes" / "ckpt" / "iter_0000006")
    return helpers.reference_run(workdir, name, checkpoint={"resume": resume})


@pytest.fixture(scope="session")
def resumed_single_process_results(workdir, two_process_results, eight_process_results, four_process_sp_results):
    """In one process, from the checkpoints of the two- and eight-process runs: the matrix's
    resumes at one process and its controls; the eight-process run resumed here (and its
    control); the real-data mixture resumed at DP=1 from DP=2; a second stage after the DP=2
    mixture (real_data.stage_two_calls). And from copies of the matrix's one-process
    checkpoints: a resume from one with a truncated file and nothing older to fall back to, the
    same without recorded checksums, and a background save on a full disk. The bf16 and the
    sequence-parallel resumes at one process."""
    one_process = str(reshard.checkpoints(workdir, "one-process"))
    mixture_resumed = real_data.mixture_run(
        workdir / "real-data", workdir / "mixture-dp2-to-1",
        checkpoint={"resume": str(workdir / "mixture-dp2" / "ckpt" / "iter_0000004")})
    resumes = reshard.calls(workdir, 1, "resume") + [
        (helpers.train_from_dict, (eight_to_one(workdir, "eight-to-one"),)),
        (reshard.train_forgetting_optimizer, (eight_to_one(workdir, "eight-to-one-forgetting"), "all")),
        (helpers.train_from_dict, (mixture_resumed,)),
    ]
    # Before the damaged copies: checkpoint saves in this process after the full-disk run fail
    # (seen: Megatron-Core's writer reports "unexpected pos"; the cause, in a process that has
    # had its file-size limit lifted again, is not found yet), so that run stays last.
    stage_two = real_data.stage_two_calls(workdir)
    bf16_calls = bf16.calls(workdir, 1, "resume")
    damaged = [
        (broken.copy_checkpoint, (one_process, str(workdir / "truncated" / "ckpt"), "iter_0000006",
                                  "model/__0_0.distcp", "truncate")),
        (broken.train_catching, (on_a_copy(workdir, "one-process", "truncated", schedule={"train_steps": 8}),)),
        (broken.copy_checkpoint, (one_process, str(workdir / "unrecorded" / "ckpt"), "iter_0000006",
                                  "optimizer/__0_0.distcp", "truncate", True)),
        (broken.train_catching, (on_a_copy(workdir, "one-process", "unrecorded", schedule={"train_steps": 8}),)),
        (broken.copy_checkpoint, (one_process, str(workdir / "disk-full-async" / "ckpt"), "iter_0000003")),
        (broken.train_catching, (on_a_copy(workdir, "one-process", "disk-full-async", checkpoint={"async_save": True}),
                                 broken.FILE_SIZE_LIMIT)),
    ]
    sp_calls = sp.calls(sp.workdir_of(workdir), 1, "last")
    (resumed_codes,), (stage_two_codes,), (bf16_codes,), sp_results, (damaged_results,) = in_one_start(
        1, resumes, stage_two, bf16_calls, list(sp_calls.values()), damaged)
    *matrix, resumed, forgetting, mixture = resumed_codes
    _, truncated, _, unrecorded, _, disk_full_async = damaged_results
    return {"bf16_codes": bf16_codes, "matrix_codes": matrix, "eight_to_one_codes": [resumed, forgetting],
            "mixture_resumed_code": mixture, "truncated": truncated, "unrecorded": unrecorded,
            "disk_full_async": disk_full_async, "stage_two_codes": stage_two_codes,
            "sp": by_name(sp_calls, sp_results)}
