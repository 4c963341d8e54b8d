"""Resume on the real data path: indexed datasets written by ``megalong preprocess`` and
``megalong sft-data``, read through megalong's TrainStream (tests/training/real_data.py).

``megalong train`` runs as a command, is killed with SIGKILL between checkpoints and run
again; every loss it logs, before and after, equals the uninterrupted run's bitwise (same
layout, deterministic CPU kernels), and so do the samples each step trained on
(``logging.log_samples``). The checkpoint it resumes from is damaged first (the mixture) or
the save after the resume fails on a full disk (SFT), so these runs also show what a user
sees then. A resume at another data-parallel size is checked sample by sample.
"""

import signal
from collections import Counter

import pytest
import yaml

from megalong.training.checkpoint import verify_checkpoint
from tests.training import broken, real_data
from tests.training.helpers import REL_TOLERANCE, read_rows, start_training_command, wait_for_step


def _by_step(metrics) -> dict:
    return {row["step"]: row for row in read_rows(metrics)}


def _command_run(workdir, name: str, make_run, **checkpoint):
    run_dir = workdir / name
    run = make_run(workdir / "real-data", run_dir,
                   checkpoint={"save_dir": str(run_dir / "ckpt"), "save_interval": 2, "keep_last": 2, **checkpoint})
    recipe = run_dir / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(run))
    return run_dir, recipe, run_dir / "metrics.jsonl"


def _kill_after(recipe, metrics, log, step: int) -> None:
    proc = start_training_command(recipe, log)
    wait_for_step(proc, metrics, step)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _latest_step(save_dir) -> int:
    return int((save_dir / "latest").read_text().strip().removeprefix("iter_"))


def _assert_rows_equal_uninterrupted(rows, uninterrupted) -> None:
    for row in rows:
        expected = uninterrupted[row["step"]]
        assert (row["loss"], row["samples"]) == (expected["loss"], expected["samples"]), row["step"]


@pytest.fixture(scope="module")
def uninterrupted(workdir, single_process_results):
    assert single_process_results["data_build_codes"] == [0, 0, 0]
    assert single_process_results["mixture_code"] == 0 and single_process_results["sft_code"] == 0
    return {name: _by_step(workdir / name / "metrics.jsonl") for name in ("mixture", "sft")}


def test_mixture_killed_resumes_exactly_past_a_corrupted_checkpoint(workdir, uninterrupted):
    """Long + concat mixture: SIGKILL after step 5 (checkpoints every 2 steps, 2 kept); bytes
    inside the newest checkpoint's model file change (size unchanged: a load would not fail);
    the rerun names the file, falls back to the older checkpoint and ends as uninterrupted."""
    run_dir, recipe, metrics = _command_run(workdir, "mixture-command", real_data.mixture_run)
    _kill_after(recipe, metrics, run_dir / "killed.log", 5)
    save_dir = run_dir / "ckpt"
    newest = _latest_step(save_dir)  # 4, or 6 if step 6 and its save slipped in before the kill
    damaged = save_dir / f"iter_{newest:07d}" / "model" / "__0_0.distcp"
    broken.damage(damaged, "corrupt")

    proc = start_training_command(recipe, run_dir / "resumed.log")
    assert proc.wait(timeout=300) == 0, (run_dir / "resumed.log").read_text()[-3000:]
    text = (run_dir / "resumed.log").read_text()
    assert f"{damaged} does not match the checksum recorded when it was written" in text
    assert f"Falling back to the older complete checkpoint {save_dir / f'iter_{newest - 2:07d}'}" in text

    rows = read_rows(metrics)
    steps = [row["step"] for row in rows]
    assert steps[-(8 - newest + 2):] == list(range(newest - 1, 9))  # redone from the older checkpoint
    assert set(steps) == set(range(1, 9))
    _assert_rows_equal_uninterrupted(rows, uninterrupted["mixture"])
    kept = sorted(p for p in save_dir.iterdir() if p.name.startswith("iter_"))
    assert [p.name for p in kept] == ["iter_0000006", "iter_0000008"]  # the damaged one was rewritten, then pruned
    for checkpoint in kept:
        assert verify_checkpoint(checkpoint) == []


def test_sft_killed_then_a_full_disk_then_resumed_exactly(workdir, uninterrupted):
    """SFT on ``megalong sft-data`` output, in bf16: SIGKILL after step 3; the rerun may not
    write files over 200 KB (a full disk for the model and optimizer files) and stops at its
    first save with an error saying so, `latest` unchanged; a third run ends as uninterrupted,
    bitwise (bf16 weights and fp32 master weights restored exactly)."""
    run_dir, recipe, metrics = _command_run(workdir, "sft-command", real_data.sft_run)
    _kill_after(recipe, metrics, run_dir / "killed.log", 3)
    save_dir = run_dir / "ckpt"
    before = _latest_step(save_dir)  # 2, or 4 if the save of step 4 slipped in before the kill

    full = start_training_command(recipe, run_dir / "disk-full.log", file_size_limit=broken.FILE_SIZE_LIMIT)
    assert full.wait(timeout=300) == 1
    text = (run_dir / "disk-full.log").read_text()
    failed = save_dir / f"iter_{before + 2:07d}.tmp"
    assert f"Checkpoint of step {before + 2} could not be written to {failed}" in text
    assert f"may not write files over {broken.FILE_SIZE_LIMIT:,} bytes" in text
    assert f"`latest` still names iter_{before:07d}" in text and "Training stops here" in text
    assert "Traceback" not in text  # the error is the message, not a stack
    assert _latest_step(save_dir) == before
    assert not failed.exists() and not failed.with_suffix("").exists()  # nothing half-written kept

    proc = start_training_command(recipe, run_dir / "resumed.log")
    assert proc.wait(timeout=300) == 0, (run_dir / "resumed.log").read_text()[-3000:]
    rows = read_rows(metrics)
    assert set(row["step"] for row in rows) == set(range(1, 9)) and rows[-1]["step"] == 8
    _assert_rows_equal_uninterrupted(rows, uninterrupted["sft"])
    assert _latest_step(save_dir) == 8


def test_resumed_at_another_data_parallel_size_no_sample_is_lost_or_repeated(
        workdir, uninterrupted, two_process_results, resumed_single_process_results):
    """The mixture at DP=2 saved at step 4 and resumed at DP=1: the samples its eight steps
    trained on (steps 1-4 on two ranks, 5-8 on one) are the uninterrupted run's, step by step."""
    assert two_process_results["mixture_dp2_codes"] == [0, 0]
    assert resumed_single_process_results["mixture_resumed_code"] == 0
    at_dp2 = [row for row in read_rows(workdir / "mixture-dp2" / "metrics.jsonl") if row["step"] <= 4]
    at_dp1 = read_rows(workdir / "mixture-dp2-to-1" / "metrics.jsonl")
    history = at_dp2 + at_dp1
    assert [row["step"] for row in history] == list(range(1, 9))
    assert [len(row["samples"]) for row in history] == [2] * 4 + [1] * 4  # one list per DP rank

    def consumed(row):
        return Counter(tuple(sample) for rank in row["samples"] for sample in rank)

    for row in history:
        assert consumed(row) == consumed(uninterrupted["mixture"][row["step"]]), row["step"]
    everything = sum((consumed(row) for row in history), Counter())
    assert sum(everything.values()) == 8 * 4 and max(everything.values()) == 1  # none twice
    assert {domain for domain, _ in everything} == {"books", "web"}
    for row in at_dp1:  # another layout's sums since step 1: rounding only
        assert row["loss"] == pytest.approx(uninterrupted["mixture"][row["step"]]["loss"], rel=REL_TOLERANCE)
