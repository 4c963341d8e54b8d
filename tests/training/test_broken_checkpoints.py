"""Broken checkpoints: damaged files are named before anything is loaded (a resume falls back
to an older complete checkpoint or stops), and a save that fails part-way publishes nothing.

Detection: every file's size and CRC-32 are recorded in ``checksums.json`` when a checkpoint
is published (megalong.checkpoint.checksums) and compared before it is loaded. A load alone
would not do: torch reports a truncated file as a bare EOFError naming no file, and changed
bytes inside a tensor load silently. The command-line cases (a corrupted checkpoint with an
older one to fall back to; a full disk under ``megalong train``) are in test_real_data_resume.
"""

import pytest

from megalong.checkpoint import checksums
from megalong.training.checkpoint import verify_checkpoint
from tests.training import broken


def test_a_save_that_fails_part_way_publishes_nothing_and_stops_every_rank(workdir, two_process_results):
    """DP=2, resumed at step 3; at the save of step 6 rank 0 (which writes the model and
    optimizer files at DP=2) may not write files over 200 KB; rank 1 writes its files."""
    rank0, rank1 = two_process_results["disk_full"]
    for message in (rank0, rank1):  # both ranks stop with the same error: none waits forever
        assert message.startswith("CheckpointError: Checkpoint of step 6 could not be written to "), message
        assert "`latest` still names iter_0000003" in message and "Training stops here" in message
    assert "may not write files over 200,000 bytes (ulimit -f)" in rank0 and "rank 0: " in rank0
    save_dir = workdir / "disk-full" / "ckpt"
    assert (save_dir / "latest").read_text() == "iter_0000003\n"
    assert sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_")) == ["iter_0000003"]
    assert verify_checkpoint(save_dir / "iter_0000003") == []


def test_a_truncated_file_with_nothing_to_fall_back_to_stops_the_resume_naming_it(
        workdir, resumed_single_process_results):
    message = resumed_single_process_results["truncated"]
    damaged = workdir / "truncated" / "ckpt" / "iter_0000006" / "model" / "__0_0.distcp"
    expected = f"CheckpointError: Cannot resume: checkpoint {damaged.parents[1]} cannot be used: "
    assert message.startswith(expected), message
    assert f"{damaged} has {damaged.stat().st_size:,} bytes, " in message and "were written (truncated)" in message
    assert "no older complete checkpoint is kept" in message
    assert not (workdir / "truncated" / "m.jsonl").exists()  # nothing trained


def test_without_recorded_checksums_the_load_error_names_the_checkpoint_part(workdir, resumed_single_process_results):
    """As an earlier megalong wrote checkpoints: torch's own error (a bare EOFError) only."""
    message = resumed_single_process_results["unrecorded"]
    part = workdir / "unrecorded" / "ckpt" / "iter_0000006" / "optimizer"
    assert message.startswith(f"CheckpointError: {part} cannot be loaded: rank 0: EOFError"), message


def test_a_background_save_that_fails_publishes_nothing_and_stops(workdir, resumed_single_process_results):
    """checkpoint.async_save: the write fails in the background process; the run stops when
    it collects the result (at the final save here)."""
    message = resumed_single_process_results["disk_full_async"]
    assert message.startswith("CheckpointError: Checkpoint of step 6 could not be written to "), message
    assert "`latest` still names iter_0000003" in message and "(ulimit -f)" in message
    save_dir = workdir / "disk-full-async" / "ckpt"
    assert (save_dir / "latest").read_text() == "iter_0000003\n"
    assert sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_")) == ["iter_0000003"]


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
def test_checksums_name_a_damaged_file(tmp_path, how):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "train_state.json").write_text("{}")
    files = checksums.checkpoint_files(tmp_path)
    checksums.write(tmp_path, checksums.records(tmp_path, files))
    assert checksums.checkpoint_files(tmp_path) == files == ["model/__0_0.distcp", "train_state.json"]
    recorded = checksums.read(tmp_path)
    assert verify_checkpoint(tmp_path) == []
    broken.damage(tmp_path / "model" / "__0_0.distcp", how)
    (problem,) = verify_checkpoint(tmp_path)
    assert problem.startswith(str(tmp_path / "model" / "__0_0.distcp"))
    assert ("has 8,192 bytes, 16,384 were written (truncated)" if how == "truncate"
            else "does not match the checksum recorded") in problem
    (tmp_path / "train_state.json").unlink()
    (missing,) = checksums.problems(tmp_path, recorded, ["train_state.json"])
    assert missing.endswith("train_state.json cannot be read (No such file or directory)")


def test_which_rank_checksums_which_file():
    assert checksums.owner("model/__3_1.distcp", 8) == 3
    assert checksums.owner("optimizer/__5_0.distcp", 4) == 1  # saved by rank 5, now 4 ranks
    assert checksums.owner("model/.metadata", 8) == checksums.owner("train_state.json", 8) == 0


def test_a_checkpoint_without_checksums_is_not_verified_but_loads(tmp_path):
    (tmp_path / "model").mkdir()
    assert verify_checkpoint(tmp_path) == []
    (tmp_path / "checksums.json").write_text("{not json")
    (problem,) = verify_checkpoint(tmp_path)
    assert problem.startswith(f"{tmp_path / 'checksums.json'} cannot be read")
