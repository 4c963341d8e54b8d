"""Logs a person reads once: rank 0's INFO lines, every rank's warnings tagged with its rank."""

import logging

import pytest

from megalong.runtime import read_launch_env
from megalong.runtime.launch import run_processes
from megalong.runtime.logs import ALL_RANKS_ENV, launch_rank, setup_logging
from tests.runtime.log_workers import speak


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines_with(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


def test_two_process_job_prints_info_once_and_tags_warnings(capfd, restore_root_logger):
    # The parent logs at INFO, as under the `megalong` command; the processes (spawned, each
    # imports torch: 10-30 s on two shared cores) write to the same stderr.
    setup_logging("INFO", environ={})
    run_processes(speak, 2)
    lines = capfd.readouterr().err.splitlines()
    (start,) = _lines_with(lines, "the job starts")
    assert start.split()[1:3] == ["INFO", "megalong.test_logs:"]  # rank 0 speaks for the job: no tag
    assert _lines_with(lines, "details of rank 0") and not _lines_with(lines, "details of rank 1")
    (odd,) = _lines_with(lines, "rank 1 sees something odd")
    assert odd.startswith("[rank 1] ") and " WARNING " in odd
    (library,) = _lines_with(lines, "UserWarning: a library warns on rank 1")  # Python warnings too
    assert library.startswith("[rank 1] ") and " WARNING py.warnings:" in library


def _say(capsys) -> str:
    log = logging.getLogger("megalong.test_logs")
    log.info("an info line")
    log.warning("a warning line")
    return capsys.readouterr().err


def test_single_process_lines_are_untagged(capsys, restore_root_logger):
    setup_logging("INFO", environ={})
    err = _say(capsys)
    assert "INFO megalong.test_logs: an info line" in err and "[rank" not in err


def test_slurm_rank_is_known_before_torch_distributed(capsys, restore_root_logger):
    setup_logging("INFO", environ={"SLURM_PROCID": "3", "SLURM_NTASKS": "4"})
    err = _say(capsys)
    assert "an info line" not in err
    assert err.startswith("[rank 3] ") and "WARNING megalong.test_logs: a warning line" in err


def test_all_ranks_on_request_every_line_tagged(capsys, restore_root_logger):
    setup_logging("INFO", environ={"RANK": "1", "WORLD_SIZE": "2", ALL_RANKS_ENV: "1"})
    err = _say(capsys).splitlines()
    assert err[0].startswith("[rank 1] ") and err[0].endswith("INFO megalong.test_logs: an info line")
    assert err[1].startswith("[rank 1] ") and err[1].endswith("WARNING megalong.test_logs: a warning line")


def test_setting_up_again_replaces_the_handler(capsys, restore_root_logger):
    setup_logging("INFO", environ={})
    setup_logging("WARNING", environ={ALL_RANKS_ENV: "0"})
    err = _say(capsys)
    assert "an info line" not in err and err.count("a warning line") == 1


@pytest.mark.parametrize("environ", [
    {},
    {"RANK": "3", "WORLD_SIZE": "8"},
    {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n1"},
    # torchrun inside a SLURM allocation: torchrun's rank wins, as in read_launch_env.
    {"RANK": "6", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
])
def test_rank_agrees_with_the_launch_environment(environ):
    launch = read_launch_env(environ)
    assert launch_rank(environ) == (launch.rank, launch.world_size)
