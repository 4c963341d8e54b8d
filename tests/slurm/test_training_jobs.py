"""Acceptance on the real local cluster: training through a time limit, a preemption by
slurmctld and a cancellation (srun and torchrun launchers), conversion, preprocessing arrays.

Every job is submitted with ``megalong submit`` exactly as a user would (CPU processes
instead of GPUs). Needs ``megalong train`` and ``megalong preprocess`` in this build.
"""

import filecmp
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.slurm.cluster import (REPO, Trigger, fire_triggers, job_records, sbatch_wrap, wait_for_job,
                                 wait_for_log_line)

pytest.importorskip("megalong.cli.train", reason="megalong train is not in this build")
pytest.importorskip("megalong.cli.preprocess", reason="megalong preprocess is not in this build")

TRAIN_STEPS = 60  # keeps the time-limit job's first run training until SLURM's warning comes
PERIODIC_SAVE = 25


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


def _train_args(dataset_prefix: Path, save_dir: Path, name: str, log_dir: Path, procs: int = 2,
                time_limit: str = "10:00") -> list[str]:
    """``megalong submit`` arguments of the tiny CPU model's training on the test dataset."""
    overrides = [f"data.data_root={dataset_prefix.parent}", "data.seq_length=64",
                 f"data.domains=[{{name: text, weight: 1, kind: concat, paths: [{dataset_prefix.name}]}}]",
                 f"schedule.train_steps={TRAIN_STEPS}", "schedule.global_batch_size=2",
                 "schedule.micro_batch_size=1", "schedule.lr_warmup_steps=2",
                 f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=0", "logging.log_interval=1"]
    args = [str(REPO / "examples" / "tiny_cpu.yaml"), "--gpus-per-node", "0", "--procs-per-node", str(procs),
            "--job-name", name, "--log-dir", str(log_dir), "--time", time_limit]
    for override in overrides:
        args += ["--set", override]
    return args


@dataclass
class Job:
    id: str
    log: Path
    save_dir: Path


def _losses(save_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; every step exactly once (a resumed job neither loses nor repeats one)."""
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, TRAIN_STEPS + 1)), f"{save_dir / 'metrics.jsonl'}: steps {steps}"
    return {r["step"]: r["loss"] for r in records}


def _assert_same_losses(run: Path, reference: Path) -> None:
    # Exact: the resumed run restores the fp32 weights, optimizer and data position exactly,
    # and the same 2 processes add the same numbers in the same order as the reference.
    assert _losses(run) == _losses(reference)


@pytest.fixture(scope="module")
def training_jobs(slurm_env, dataset, tmp_path_factory):
    """All training jobs at once (they share the node's CPU slots), each acted on mid-run.

    - ``reference``: runs uninterrupted (srun launcher).
    - ``preempted``: in the 'preemptible' partition holding the cluster's one token; an
      'urgent' job asking for the token makes slurmctld preempt it (PreemptMode=REQUEUE).
    - ``time_limit``: torchrun launcher, a real 1-minute time limit with SLURM's warning
      40 s before it; chained to a conversion job (afterok).
    - ``cancelled``: scancel'ed while training.
    """
    _, prefix = dataset
    root = tmp_path_factory.mktemp("training")
    logs = root / "logs"

    def submit(name: str, *extra: str, procs: int = 2, time_limit: str = "10:00") -> tuple[Job, list[str]]:
        save_dir = root / name
        ids, job_logs = _submit(slurm_env, _train_args(prefix, save_dir, name, logs, procs, time_limit) + list(extra))
        return Job(ids[0], Path(job_logs[0]), save_dir), ids[1:] + job_logs[1:]

    # The time-limit job first: it has the longest way (two runs, then the conversion).
    # SLURM checks time limits every 30 s and warns a job at the first check that finds
    # less than --signal-seconds + 30 s left: with 40 s of a 1-minute limit, that is the
    # first check after the job starts, at most 30 s in, and TRAIN_STEPS keeps run 1
    # training past that.
    hf_dir = root / "hf"
    tl, (convert_id, convert_log) = submit(
        "time-limit", "--launcher", "torchrun", "--signal-seconds", "40",
        "--convert", f"megatron-to-hf {root / 'time-limit'} {hf_dir} --no-tokenizer", time_limit="1")
    jobs = {"time_limit": tl,
            # Preempted after a periodic checkpoint: the helper processes of that save are alive
            # when slurmctld's SIGTERM reaches every process of the job.
            "preempted": submit("preempted", "--partition", "preemptible", "--sbatch-arg=--gres=token:1",
                                "--set", f"checkpoint.save_interval={PERIODIC_SAVE}")[0],
            "reference": submit("reference")[0],
            "cancelled": submit("cancelled", procs=1)[0]}  # one CPU slot: it only has to start training

    urgent: list[str] = []

    def preempt() -> None:
        urgent.append(sbatch_wrap(slurm_env, "true", "--partition=urgent", "--gres=token:1",
                                  f"--output={logs}/urgent-%j.out"))

    def give_run_2_time() -> None:
        # Every run of the job gets the same warning: let the resumed run finish instead
        # of being stopped again (SLURM re-arms the warning on requeue).
        subprocess.run(["scontrol", "update", f"JobId={tl.id}", "TimeLimit=10"], check=True, env=slurm_env)

    triggers = {
        "preempted": Trigger(jobs["preempted"].id, jobs["preempted"].log,
                             rf"Saved checkpoint of step {PERIODIC_SAVE}\b", preempt),
        "time_limit": Trigger(tl.id, tl.log, r"requeueing job", give_run_2_time),
        "cancelled": Trigger(jobs["cancelled"].id, jobs["cancelled"].log, rf"step 1/{TRAIN_STEPS}\b",
                             lambda: subprocess.run(["scancel", jobs["cancelled"].id], check=True, env=slurm_env)),
    }
    fire_triggers(list(triggers.values()), slurm_env, timeout_s=400)
    return SimpleNamespace(jobs=jobs, triggers=triggers, urgent=urgent, convert=(convert_id, Path(convert_log)),
                           hf_dir=hf_dir)


def _completed_once_requeued(job: Job, env) -> tuple[str, int]:
    """The job's log after it completed with exactly one requeue, and the step it resumed at."""
    (record,) = wait_for_job(job.id, env, timeout_s=400)
    log_text = job.log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log_text[-3000:]
    assert int(record["Restarts"]) == 1, log_text[-3000:]
    assert "requeueing job" in log_text and "start 2," in log_text and "training finished" in log_text
    resumed = re.search(r"Resuming from checkpoint \S+ at step (\d+)", log_text)
    assert resumed and 1 <= int(resumed.group(1)) < TRAIN_STEPS, log_text[-3000:]
    return log_text, int(resumed.group(1))


def test_uninterrupted_job_and_slurmctld_preemption_resumes_to_the_same_losses(training_jobs, slurm_env):
    jobs = training_jobs.jobs
    reference = jobs["reference"]
    (record,) = wait_for_job(reference.id, slurm_env, timeout_s=400)
    log_text = reference.log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log_text[-3000:]
    assert "over 2 processes" in log_text and "training finished" in log_text
    assert (reference.save_dir / "latest").read_text().strip() == f"iter_{TRAIN_STEPS:07d}"
    assert (reference.save_dir / f"iter_{TRAIN_STEPS:07d}" / "model").is_dir()

    # slurmctld preempted the job for the urgent one: SIGTERM to its processes at the start
    # of the grace time; they saved, the script requeued, the urgent job ran, the job resumed.
    preempted = jobs["preempted"]
    assert training_jobs.triggers["preempted"].fired, preempted.log.read_text()[-3000:]
    log_text, resumed_at = _completed_once_requeued(preempted, slurm_env)
    assert resumed_at > PERIODIC_SAVE, log_text[-3000:]  # from the checkpoint saved on SIGTERM
    assert re.search(r"Stopping after step \d+: received SIGTERM", log_text), log_text[-3000:]
    (urgent_id,) = training_jobs.urgent
    (urgent,) = wait_for_job(urgent_id, slurm_env)
    assert urgent["JobState"] == "COMPLETED", urgent
    _assert_same_losses(preempted.save_dir, reference.save_dir)


def test_time_limit_warning_requeues_torchrun_job_then_conversion_runs(training_jobs, slurm_env):
    tl = training_jobs.jobs["time_limit"]
    assert training_jobs.triggers["time_limit"].fired, tl.log.read_text()[-3000:]
    log_text, _ = _completed_once_requeued(tl, slurm_env)
    # SLURM's USR1 reached the batch script, which passed it on to the training processes.
    assert "SLURM's warning (USR1" in log_text
    assert re.search(r"Stopping after step \d+: received SIGUSR1", log_text), log_text[-3000:]
    assert "torchrun launcher" in log_text
    wait_for_job(training_jobs.jobs["reference"].id, slurm_env, timeout_s=400)
    _assert_same_losses(tl.save_dir, training_jobs.jobs["reference"].save_dir)

    convert_id, convert_log = training_jobs.convert
    (convert,) = wait_for_job(convert_id, slurm_env, timeout_s=120)
    assert convert["JobState"] == "COMPLETED", convert_log.read_text()[-3000:]
    # afterok waited through the requeue: the conversion read the final checkpoint.
    (tl_record,) = job_records(tl.id, slurm_env)
    assert convert["StartTime"] >= tl_record["EndTime"], (convert, tl_record)
    assert "conversion ended with exit code 0" in convert_log.read_text()
    config = json.loads((training_jobs.hf_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 128
    assert list(training_jobs.hf_dir.glob("*.safetensors"))


def test_scancel_ends_a_training_job_for_good(training_jobs, slurm_env):
    cancelled = training_jobs.jobs["cancelled"]
    assert training_jobs.triggers["cancelled"].fired, cancelled.log.read_text()[-3000:]
    # Training saves on SIGTERM and exits with "requeue me": the batch script, itself told
    # to stop, must not requeue (that would undo the user's scancel).
    log_text = wait_for_log_line(cancelled.log, r"does not requeue it|requeueing job")
    assert "SLURM is ending the job" in log_text and "does not requeue it" in log_text, log_text[-3000:]
    assert re.search(r"Stopping after step \d+: received SIGTERM", log_text), log_text[-3000:]
    (record,) = wait_for_job(cancelled.id, slurm_env)
    assert record["JobState"] == "CANCELLED" and int(record["Restarts"]) == 0, record
    assert (cancelled.save_dir / "latest").is_file()


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
