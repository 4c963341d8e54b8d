"""Resume after a real kill, SLURM array tasks + merge, and refusing to mix settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalong.cli.main import main
from megalong.data.preprocess import IncompleteError, PlanMismatchError
from megalong.data.preprocess.indexed_writer import process_alive
from tests.data.preprocess_helpers import file_bytes, preprocess, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]


def _stdlib_corpus(path: Path, target_bytes: int) -> Path:
    """JSONL of Python standard-library sources, one document per file, about target_bytes."""
    import json as json_module

    records, total = [], 0
    for source in sorted(Path(json_module.__file__).parents[1].glob("*.py")):
        text = source.read_text(encoding="utf-8", errors="replace")
        records.append({"text": text})
        total += len(text)
        if total >= target_bytes:
            break
    return write_jsonl(path, records)


def _shard_files(work_dir: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work_dir.glob("shard_*") if ".tmp." not in p.name}


def test_resume_after_kill_gives_the_same_bytes_without_redoing_shards(tmp_path):
    corpus = _stdlib_corpus(tmp_path / "corpus.jsonl", 4_000_000)
    prefix = tmp_path / "out" / "resumed"
    work_dir = Path(f"{prefix}.work")
    flags = ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", "llama3",
             "--shard-size-mb", "0.05", "--keep-work"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "megalong", "preprocess", *flags, "--workers", "2"],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(work_dir.glob("shard_*.json"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    # Workers die with their parent (PR_SET_PDEATHSIG); wait for those that had files open, as
    # a resume leaves a live process's temporary files alone.
    deadline = time.monotonic() + 30
    while any(process_alive(int(p.name.rsplit(".", 1)[1])) for p in work_dir.glob("*.tmp.*")):
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.05)
    plan = json.loads((work_dir / "plan.json").read_text())
    finished_before = _shard_files(work_dir)
    done = [name for name in finished_before if name.endswith(".json")]
    assert 3 <= len(done) < len(plan["shards"]), "the kill did not land mid-run"
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()

    # Resume (in this process, one worker: the worker count is not part of the plan).
    sidecar = preprocess([corpus], prefix, shard_size_mb=0.05, keep_work=True)
    # The killed workers' half-written shards were removed, not left behind.
    assert not list(work_dir.glob("*.tmp.*")) and not list(prefix.parent.glob("*.tmp.*"))
    after = _shard_files(work_dir)
    for name, state in finished_before.items():
        if name.replace(".bin", ".json").replace(".idx", ".json") in done:
            assert after[name] == state, f"{name} was rewritten on resume"

    reference = tmp_path / "out" / "uninterrupted"
    preprocess([corpus], reference, shard_size_mb=0.05)
    assert file_bytes(prefix) == file_bytes(reference)
    assert sidecar["documents"] > 0 and sidecar["shards"] == len(plan["shards"])


def test_array_tasks_then_merge_equal_a_single_run(tmp_path, monkeypatch, caplog):
    texts = [f"document {i}: " + "words and more words " * (i % 17) for i in range(300)]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    prefix = tmp_path / "arr"
    flags = ["preprocess", "--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", "llama3",
             "--shard-size-mb", "0.004", "--workers", "1", "--dedup"]

    # Task 1 of 2 from the SLURM environment (--array=2-3 numbers tasks from 2).
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(flags + ["--stage", "tokenize"]) == 0
    work_dir = Path(f"{prefix}.work")
    num_shards = len(json.loads((work_dir / "plan.json").read_text())["shards"])
    assert num_shards >= 4
    done = sorted(int(p.stem.split("_")[1]) for p in work_dir.glob("shard_*.json"))
    assert done == list(range(1, num_shards, 2))
    assert not Path(f"{prefix}.bin").exists()

    # Merging before every task has finished is refused, naming what is missing.
    assert main(flags + ["--stage", "merge"]) == 1
    assert "not finished yet" in caplog.text and "shard ids 0, 2" in caplog.text

    # Task 0 from explicit flags (they override the environment), then the merge.
    assert main(flags + ["--stage", "tokenize", "--task-index", "0", "--num-tasks", "2"]) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert main(flags + ["--stage", "merge"]) == 0

    preprocess([corpus], tmp_path / "single", dedup=True)
    assert file_bytes(prefix) == file_bytes(tmp_path / "single")
    assert not work_dir.exists()


def test_resume_refuses_other_settings_and_changed_inputs(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text {i}" for i in range(50)])
    prefix = tmp_path / "out"
    preprocess([corpus], prefix, keep_work=True)
    with pytest.raises(PlanMismatchError, match="min_tokens"):
        preprocess([corpus], prefix, min_tokens=5)
    with open(corpus, "a") as handle:
        handle.write(json.dumps({"text": "appended later"}) + "\n")
    with pytest.raises(PlanMismatchError, match="input files changed"):
        preprocess([corpus], prefix)


def test_rerun_after_success_does_nothing(tmp_path, caplog):
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text {i}" for i in range(20)])
    first = preprocess([corpus], tmp_path / "out")
    before = Path(f"{tmp_path}/out.bin").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = preprocess([corpus], tmp_path / "out")
    assert again == first and "nothing to do" in caplog.text
    assert Path(f"{tmp_path}/out.bin").stat().st_mtime_ns == before


def test_merge_without_shards_names_them(tmp_path):
    from megalong.data.preprocess import PreprocessConfig
    from megalong.data.preprocess.pipeline import load_or_create_plan, merge
    from tests.data.preprocess_helpers import llama3

    corpus = write_jsonl(tmp_path / "c.jsonl", ["a b c"] * 10)
    cfg = PreprocessConfig(inputs=[str(corpus)], output_prefix=str(tmp_path / "out"))
    with pytest.raises(IncompleteError, match="1 of 1 shards"):
        merge(cfg, load_or_create_plan(cfg, llama3()))


def test_a_shard_with_wrong_file_sizes_is_tokenized_again(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text number {i} " * 5 for i in range(200)])
    prefix = tmp_path / "out"
    preprocess([corpus], prefix, keep_work=True, shard_size_mb=0.004)
    reference = file_bytes(prefix)
    shard = Path(f"{prefix}.work/shard_000001.bin")
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # as if the data never reached the disk
    preprocess([corpus], prefix, keep_work=True, shard_size_mb=0.004)
    assert shard.read_bytes() == good
    assert file_bytes(prefix) == reference
