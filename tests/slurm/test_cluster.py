"""The real local cluster: it is up, runs a 2-task gloo job, and refused layouts never reach it."""

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from tests.slurm.cluster import REPO, all_job_ids, sbatch, wait_for_job


def test_node_is_idle_or_busy_but_up(slurm_env):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], capture_output=True, text=True, env=slurm_env)
    assert out.returncode == 0, out.stderr
    name, state, cpus = out.stdout.split()[:3]
    assert state.rstrip("*") in ("idle", "mixed", "allocated"), out.stdout
    assert int(cpus) >= 2


def test_two_task_srun_job_all_reduces_over_gloo(slurm_env, tmp_path):
    script = tmp_path / "allreduce.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=allreduce --ntasks=2 --output={tmp_path}/%x-%j.out --chdir={REPO}
        srun {sys.executable} -m tests.slurm.allreduce_worker {tmp_path}
        """))
    job = sbatch(script, slurm_env)
    (record,) = wait_for_job(job, slurm_env, timeout_s=120)
    log = (tmp_path / f"allreduce-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    port = 29500 + 1 + int(job) % 20000  # megalong's per-job port: two jobs on a node never collide
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().split() == ["slurm", str(rank), "2", str(port), "3"]


def test_invalid_layout_is_refused_before_submission(slurm_env, tmp_path):
    recipe = tmp_path / "tp4.yaml"
    recipe.write_text("name: tp4\nparallel: {tensor_parallel: 4, context_parallel: 2}\n")
    before = all_job_ids(slurm_env)
    out = subprocess.run([sys.executable, "-m", "megalong", "submit", str(recipe), "--gpus-per-node", "0",
                          "--procs-per-node", "2", "--log-dir", str(tmp_path / "logs")],
                         capture_output=True, text=True, env=slurm_env, cwd=REPO)
    assert out.returncode == 2
    assert "refused, nothing was submitted" in out.stderr
    assert "1 node x 2 CPU processes per node = 2 processes" in out.stderr and "4 x 2 x 1 = 8" in out.stderr
    assert all_job_ids(slurm_env) == before


def test_second_cluster_refuses_busy_ports_and_starts_nothing(slurm_env, tmp_path):
    env = dict(slurm_env, MEGALONG_SLURM_DIR=str(tmp_path / "other"))
    out = subprocess.run([str(REPO / "slurm" / "local_cluster.sh"), "start"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "port 6817 is already in use" in out.stderr
    assert not (tmp_path / "other" / "started.pids").exists()
    # And `stop` there touches nothing: the running cluster stays up.
    subprocess.run([str(REPO / "slurm" / "local_cluster.sh"), "stop"], capture_output=True, env=env, check=True)
    status = subprocess.run([str(REPO / "slurm" / "local_cluster.sh"), "status"], capture_output=True, text=True,
                            env=slurm_env)
    assert status.returncode == 0, status.stderr


def test_start_after_killed_daemons_ignores_their_stale_pid_files(slurm_env):
    # Daemons killed with SIGKILL (a machine or session torn down) leave their pid files; the
    # next start must wait for the new daemons' files, not read the dead ones. A second
    # cluster on other ports keeps the running one untouched. Its state lives directly under
    # /tmp: munged runs as user munge, who cannot enter pytest's private tmp_path.
    state_dir = Path(tempfile.mkdtemp(prefix="megalong-slurm-test-"))
    state_dir.chmod(0o755)
    env = dict(slurm_env, MEGALONG_SLURM_DIR=str(state_dir),
               MEGALONG_SLURM_CTLD_PORT="16817", MEGALONG_SLURM_SLURMD_PORT="16818")
    exited = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout.strip()
    for daemon in ("slurmctld", "slurmd"):
        (state_dir / f"{daemon}.pid").write_text(exited + "\n")
    script = str(REPO / "slurm" / "local_cluster.sh")
    try:
        out = subprocess.run([script, "start"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert "is idle" in out.stderr
    finally:
        subprocess.run([script, "stop"], capture_output=True, env=env)
        shutil.rmtree(state_dir, ignore_errors=True)
    assert subprocess.run([script, "status"], capture_output=True, env=slurm_env).returncode == 0
