"""`megalong train` as a real command: SIGKILL and SIGTERM mid-run, then exact resume."""

import signal

import yaml

from megalong.training.signals import REQUEUE_EXIT_CODE
from tests.training.helpers import read_losses, read_rows, reference_run, start_training_command, wait_for_step


def test_killed_and_signalled_run_resumes_with_identical_losses(workdir, single_process_results):
    """The 12-step reference run, as a command: SIGKILL after step 5 (last checkpoint: 4),
    rerun; SIGTERM after step 8 -> checkpoint + exit 3; rerun to the end. Every step's
    loss equals the uninterrupted run's exactly (same layout, deterministic CPU kernels)."""
    run_dir = workdir / "cli"
    run = reference_run(workdir, "cli", checkpoint={"save_dir": str(run_dir / "ckpt"), "save_interval": 4,
                                                    "keep_last": 2})
    recipe = run_dir / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(run))
    metrics, log = run_dir / "metrics.jsonl", run_dir / "train.log"

    proc = start_training_command(recipe, log)
    wait_for_step(proc, metrics, 5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    proc = start_training_command(recipe, log)
    wait_for_step(proc, metrics, 8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    stopped_at = max(r["step"] for r in read_rows(metrics))
    latest = (run_dir / "ckpt" / "latest").read_text().strip()
    assert latest == f"iter_{stopped_at:07d}"

    proc = start_training_command(recipe, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    text = log.read_text()
    assert "Resuming from checkpoint" in text and "exiting with code 3" in text
    rows = read_rows(metrics)
    steps = [r["step"] for r in rows]
    assert steps.count(5) == 2  # step 5 was lost to SIGKILL and redone from the step-4 checkpoint
    assert steps.count(stopped_at + 1) == 1  # nothing was redone after SIGTERM's checkpoint
    reference = read_losses(workdir / "reference" / "metrics.jsonl")
    for row in rows:
        assert row["loss"] == reference[row["step"]], row
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.name.startswith("iter_")) == [
        f"iter_{stopped_at:07d}", "iter_0000012"]
