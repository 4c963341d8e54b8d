"""What is already at the output prefix: outputs of another run are refused unless
--overwrite, the run that planned them may finish them, and temporary files of killed runs
are removed (only those: never a live process's, another host's, or a finished shard)."""

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megalong.cli.main import main
from tests.data.preprocess_helpers import expected, file_bytes, preprocess, read_dataset, write_jsonl


def test_an_unrelated_file_at_the_prefix_is_refused_unless_overwrite(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["one", "two"])
    (tmp_path / "out.bin").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match=rf"^{tmp_path / 'out.bin'} already exists \(files not made by megalong "
                                              r"preprocess\).*--overwrite"):
        preprocess([corpus], tmp_path / "out")
    assert (tmp_path / "out.bin").read_bytes() == b"someone else's file"
    assert not (tmp_path / "out.work").exists()
    preprocess([corpus], tmp_path / "out", overwrite=True)
    assert read_dataset(tmp_path / "out") == expected(["one", "two"])


def test_a_dataset_from_other_inputs_is_refused_unless_overwrite(tmp_path, caplog):
    first = write_jsonl(tmp_path / "first.jsonl", ["first corpus"])
    second = write_jsonl(tmp_path / "second.jsonl", ["second corpus"])
    prefix = tmp_path / "out"
    preprocess([first], prefix)
    before = file_bytes(prefix)
    flags = ["preprocess", "--input", str(second), "--output-prefix", str(prefix), "--tokenizer", "llama3",
             "--workers", "1"]
    with caplog.at_level(logging.ERROR):
        assert main(flags) == 1
    assert "(a dataset made with other settings (inputs))" in caplog.text and "--overwrite" in caplog.text
    assert file_bytes(prefix) == before
    assert main(flags + ["--overwrite"]) == 0
    assert read_dataset(prefix) == expected(["second corpus"])
    assert json.loads((tmp_path / "out.json").read_text())["settings"]["inputs"] == [str(second)]


def test_the_run_that_planned_the_outputs_finishes_them_without_overwrite(tmp_path):
    """A merge killed after renaming .bin/.idx into place (before the sidecar): the rerun
    finds its own plan and completes; the half-finished outputs are not 'someone else's'."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text {i}" for i in range(20)])
    prefix = tmp_path / "out"
    preprocess([corpus], tmp_path / "reference")
    preprocess([corpus], prefix, keep_work=True)
    Path(f"{prefix}.json").unlink()  # as if killed between the renames and the sidecar
    sidecar = preprocess([corpus], prefix)
    assert sidecar["documents"] == 20 and file_bytes(prefix) == file_bytes(tmp_path / "reference")


def test_a_work_directory_without_a_plan_is_refused(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["text"])
    (tmp_path / "out.work").mkdir()
    (tmp_path / "out.work" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"out.work exists without a plan.json \(it holds notes.txt\)"):
            preprocess([corpus], tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out.work" / "notes.txt").read_text() == "mine"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # reaped: no process has it now (a reuse within this test is vanishingly unlikely)


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path, caplog):
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"document {i} " * 20 for i in range(200)])
    prefix = tmp_path / "out"
    preprocess([corpus], prefix, keep_work=True, shard_size_mb=0.004, stage="tokenize")
    work = tmp_path / "out.work"
    shards = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    host, dead = socket.gethostname(), _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f"out.bin.tmp.{host}.{dead}", tmp_path / f"out.lengths.tmp.{host}.{dead}",
                 tmp_path / f"out.json.tmp.{host}.{dead}", work / f"shard_000001.bin.tmp.{host}.{dead}",
                 work / f"plan.json.tmp.{host}.{dead}"]
        left_alone = [tmp_path / f"out.idx.tmp.{host}.{alive.pid}",          # a live run on this host
                      tmp_path / f"out.bin.tmp.other-node.{dead}",           # another host: cannot tell
                      tmp_path / f"out2.bin.tmp.{host}.{dead}",              # another dataset's
                      work / f"shard_000002.idx.tmp.{host}.{alive.pid}"]
        for path in stale + left_alone:
            path.write_bytes(b"\0" * 1000)
        with caplog.at_level(logging.INFO):
            sidecar = preprocess([corpus], prefix, keep_work=True, shard_size_mb=0.004)
    finally:
        alive.kill()
        alive.wait()
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in left_alone)
    assert "removed 5 temporary files (0.0 MB) left by killed runs on this host" in caplog.text
    assert "left alone 3 temporary files" in caplog.text
    # Finished shards were neither removed nor redone; the result is complete.
    assert {name: (work / name).stat().st_mtime_ns for name in shards} == shards
    assert sidecar["documents"] == 200
    assert read_dataset(prefix) == expected([f"document {i} " * 20 for i in range(200)])
