"""Acceptance on the real local cluster: training jobs, preemption + requeue, preprocessing arrays.

Every job is submitted with ``megalong submit`` exactly as a user would (CPU processes
instead of GPUs). Needs ``megalong train`` and ``megalong preprocess`` in this build.
"""

import filecmp
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import REPO, job_records, wait_for_job

pytest.importorskip("megalong.cli.train", reason="megalong train is not in this build")
pytest.importorskip("megalong.cli.preprocess", reason="megalong preprocess is not in this build")

TRAIN_STEPS = 8


def _corpus(path: Path) -> Path:
    """Real text: the first 6,000 characters of 60 modules of Python's standard library."""
    stdlib = Path(json.__file__).resolve().parents[1]
    with path.open("w") as f:
        for module in sorted(stdlib.glob("*.py"))[:60]:
            f.write(json.dumps({"text": module.read_text(errors="ignore")[:6000]}) + "\n")
    return path


def _preprocess_args(corpus: Path, prefix: Path) -> list[str]:
    # Small shards so that an array of 3 tasks has several shards each.
    return ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", "llama3", "--shard-size-mb", "0.05"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, slurm_env):
    """One tokenized dataset made by a single local run (also the reference for the array job)."""
    root = tmp_path_factory.mktemp("data")
    corpus = _corpus(root / "corpus.jsonl")
    prefix = root / "single" / "text_document"
    out = subprocess.run([sys.executable, "-m", "megalong", "preprocess", *_preprocess_args(corpus, prefix),
                          "--workers", "1"], capture_output=True, text=True, cwd=REPO, env=slurm_env)
    assert out.returncode == 0, out.stderr[-3000:]
    return corpus, prefix


def _submit(env, args: list[str]) -> tuple[list[str], list[str]]:
    out = subprocess.run([sys.executable, "-m", "megalong", "submit", *args],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.findall(r"submitted \S+ as job (\d+).*; log: (\S+)", out.stdout)
    assert found, out.stdout
    return [job for job, _ in found], [log for _, log in found]


def _train_job(env, dataset_prefix: Path, save_dir: Path, name: str, log_dir: Path) -> tuple[str, Path]:
    overrides = [f"data.data_root={dataset_prefix.parent}", "data.seq_length=64",
                 f"schedule.train_steps={TRAIN_STEPS}", "schedule.global_batch_size=2",
                 "schedule.micro_batch_size=1", "schedule.lr_warmup_steps=2",
                 f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=0", "logging.log_interval=1"]
    args = [str(REPO / "examples" / "tiny_cpu.yaml"), "--gpus-per-node", "0", "--procs-per-node", "2",
            "--job-name", name, "--log-dir", str(log_dir), "--time", "10:00"]
    for override in overrides:
        args += ["--set", override]
    (job,), (log,) = _submit(env, args)
    return job, Path(log)


def _final_loss(save_dir: Path) -> float:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r["step"] == TRAIN_STEPS]
    assert final, f"no step {TRAIN_STEPS} in {save_dir / 'metrics.jsonl'}"
    return final[-1]["loss"]


def _wait_for_line(log: Path, pattern: str, job: str, env, timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="ignore")):
            return
        records = job_records(job, env)
        if records and records[0].get("JobState") in ("FAILED", "CANCELLED", "COMPLETED"):
            break
        time.sleep(0.2)
    raise AssertionError(f"job {job} never logged {pattern!r}:\n" + (log.read_text()[-3000:] if log.exists() else ""))


def test_training_job_completes_and_usr1_requeues_and_resumes_to_the_same_loss(slurm_env, dataset, tmp_path):
    _, prefix = dataset
    # Both run at once (the local cluster offers 4 CPU slots).
    plain_job, plain_log = _train_job(slurm_env, prefix, tmp_path / "plain", "plain", tmp_path / "logs")
    preempted_job, preempted_log = _train_job(slurm_env, prefix, tmp_path / "preempted", "preempted",
                                              tmp_path / "logs")

    # While the reference runs, the other job gets USR1 mid-run (as a preemption warning
    # would): it must checkpoint, requeue, resume from `latest` and finish.
    _wait_for_line(preempted_log, rf"step 1/{TRAIN_STEPS}\b", preempted_job, slurm_env)
    subprocess.run(["scancel", "--signal=USR1", preempted_job], check=True, env=slurm_env)

    # The uninterrupted job: 2 processes, runs to completion, leaves a checkpoint.
    (record,) = wait_for_job(plain_job, slurm_env, timeout_s=180)
    log_text = plain_log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log_text[-3000:]
    assert "over 2 processes" in log_text and "training finished" in log_text
    assert (tmp_path / "plain" / "latest").read_text().strip() == f"iter_{TRAIN_STEPS:07d}"
    assert (tmp_path / "plain" / f"iter_{TRAIN_STEPS:07d}" / "model").is_dir()

    (record,) = wait_for_job(preempted_job, slurm_env, timeout_s=180)
    log_text = preempted_log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log_text[-3000:]
    assert int(record["Restarts"]) == 1, log_text[-3000:]
    assert "requeueing job" in log_text and "start 2," in log_text
    resumed = re.search(r"Resuming from checkpoint \S+ at step (\d+)", log_text)
    assert resumed and 1 <= int(resumed.group(1)) < TRAIN_STEPS, log_text[-3000:]
    assert _final_loss(tmp_path / "preempted") == pytest.approx(_final_loss(tmp_path / "plain"), rel=1e-6, abs=1e-6)


def test_preprocessing_array_job_equals_a_single_run(slurm_env, dataset, tmp_path):
    corpus, single_prefix = dataset
    prefix = tmp_path / "array" / "text_document"
    preprocess = " ".join(_preprocess_args(corpus, prefix))
    jobs, logs = _submit(slurm_env, ["--preprocess", preprocess, "--array-tasks", "3", "--cpus-per-task", "1",
                                     "--log-dir", str(tmp_path / "logs"), "--job-name", "pre"])
    array_job, merge_job = jobs
    tasks = wait_for_job(array_job, slurm_env, timeout_s=120)
    assert len(tasks) == 3 and all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    (merge,) = wait_for_job(merge_job, slurm_env, timeout_s=120)
    assert merge["JobState"] == "COMPLETED", Path(logs[1]).read_text()[-3000:]
    # afterok: the merge started only after every array task had ended.
    assert merge["StartTime"] >= max(t["EndTime"] for t in tasks), (merge, tasks)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(f"{prefix}{suffix}", f"{single_prefix}{suffix}", shallow=False), suffix
    array_meta, single_meta = (json.loads(Path(f"{p}.json").read_text()) for p in (prefix, single_prefix))
    for key in ("documents", "tokens", "length_histogram", "skipped_total", "shards"):
        assert array_meta[key] == single_meta[key], key
