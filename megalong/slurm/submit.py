"""Hand a chain of rendered jobs to ``sbatch``, each waiting for the previous one (afterok).

Stage 1 -> stage 2 -> SFT -> export: a stage starts only after the one before it ended
successfully, requeues included (a requeued job is the same job id, so its dependants
keep waiting until it really finishes).
"""

from __future__ import annotations

import datetime
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)


class SubmitError(RuntimeError):
    """sbatch refused a job (its message is included)."""


@dataclass
class Stage:
    """One job of a chain: a short name for messages and its rendered sbatch script."""

    name: str
    script: str
    log_pattern: str  # where its log goes, for the user (e.g. logs/slurm/%x-%j.out)


def _sbatch(script_path: Path, dependency: Optional[str]) -> str:
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd.append(str(script_path))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run)") from None
    if out.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {out.stderr.strip() or out.stdout.strip()}")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    match = re.match(r"\s*(\d+)", out.stdout)
    if not match:
        raise SubmitError(f"could not read a job id from sbatch's answer {out.stdout!r}")
    return match.group(1)


def submit_chain(stages: Sequence[Stage], script_dir: Path, after: Optional[str] = None) -> list[str]:
    """Submit ``stages`` in order; return their job ids.

    Each rendered script is kept in ``script_dir`` (what ran, for later reading). ``after``
    makes the first stage wait for an existing job.
    """
    script_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    job_ids: list[str] = []
    previous = after
    for index, stage in enumerate(stages):
        path = script_dir / f"{stamp}-{index + 1}-{stage.name}.sbatch"
        tmp = path.with_suffix(".sbatch.tmp")
        tmp.write_text(stage.script, encoding="utf-8")
        tmp.rename(path)
        job_id = _sbatch(path, f"afterok:{previous}" if previous else None)
        job_ids.append(job_id)
        log_path = stage.log_pattern.replace("%j", job_id).replace("%A", job_id)
        waits = f", after job {previous}" if previous else ""
        print(f"submitted {stage.name} as job {job_id}{waits}; log: {log_path}", flush=True)
        previous = job_id
    return job_ids
