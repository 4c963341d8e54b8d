"""Talk to the local test cluster (slurm/local_cluster.sh): find it, submit, wait for jobs."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def cluster_env() -> dict | None:
    """Environment pointing slurm commands at the running local cluster, or None."""
    try:
        out = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"export SLURM_CONF=(\S+)", out.stdout)
    if out.returncode != 0 or not match:
        return None
    env = dict(os.environ)
    env["SLURM_CONF"] = match.group(1)
    env["OMP_NUM_THREADS"] = "1"
    return env


def job_records(job_id: str, env: dict) -> list[dict]:
    """``scontrol show job -o`` as dicts (one per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=env)
    records = []
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields:
            records.append(fields)
    return records


def wait_for_job(job_id: str, env: dict, timeout_s: float = 150.0) -> list[dict]:
    """Poll until every task of the job is in a terminal state (sbatch --wait polls slowly)."""
    deadline = time.monotonic() + timeout_s
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = job_records(job_id, env)
        if records and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], env=env)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s:.0f} s: {records}")


def wait_for_state(job_id: str, env: dict, predicate, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    record: dict = {}
    while time.monotonic() < deadline:
        records = job_records(job_id, env)
        if records and predicate(records[0]):
            return records[0]
        record = records[0] if records else {}
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the expected state: {record}")


def all_job_ids(env: dict) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%A"], capture_output=True, text=True, env=env)
    return set(out.stdout.split())


def sbatch(script: Path, env: dict, *args: str) -> str:
    return _sbatch_parsable([*args, str(script)], env)


def sbatch_wrap(env: dict, command: str, *args: str) -> str:
    """Submit a one-line job (``sbatch --wrap``); its job id."""
    return _sbatch_parsable([*args, "--wrap", command], env)


def _sbatch_parsable(args: list[str], env: dict) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


@dataclass
class Trigger:
    """Run ``action`` once ``pattern`` shows in a job's log (preempt it mid-training, ...)."""

    job: str
    log: Path
    pattern: str
    action: Callable[[], None]
    fired: bool = False


def _logged(log: Path, pattern: str) -> bool:
    return log.exists() and re.search(pattern, log.read_text(errors="ignore")) is not None


def fire_triggers(triggers: list[Trigger], env: dict, timeout_s: float = 300.0) -> None:
    """Watch every trigger's log at once, so that jobs running side by side are each acted
    on in time. A trigger whose job ends before its line shows stays unfired (tests check)."""
    waiting = list(triggers)
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for trigger in list(waiting):
            ended = any(r.get("JobState") in TERMINAL for r in job_records(trigger.job, env))
            if _logged(trigger.log, trigger.pattern):
                trigger.action()
                trigger.fired = True
                waiting.remove(trigger)
            elif ended:
                waiting.remove(trigger)
        time.sleep(0.3)


def wait_for_log_line(log: Path, pattern: str, timeout_s: float = 120.0) -> str:
    """The log's text once ``pattern`` shows in it (a job's state can be final before its
    batch script has written its last lines)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _logged(log, pattern):
            return log.read_text(errors="ignore")
        time.sleep(0.3)
    tail = log.read_text(errors="ignore")[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"{log} never showed {pattern!r} within {timeout_s:.0f} s:\n{tail}")

