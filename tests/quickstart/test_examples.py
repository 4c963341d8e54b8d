"""Every recipe in examples/ runs as its comments say: the ProLong recipes pass the full
training validation at their layout, and tiny_cpu.yaml trains on the quickstart's data."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalong.checkpoint.layout import write_model_config
from megalong.cli.main import main
from megalong.config import load
from megalong.data.mixture import resolve_prefix
from megalong.model import presets
from megalong.training.config import RunConfig
from tests.training.helpers import read_losses

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROLONG = sorted((EXAMPLES / "prolong").glob("*.yaml"))


def test_every_example_is_checked_here():
    assert {p.name for p in EXAMPLES.rglob("*.yaml")} == {p.name for p in PROLONG} | {"tiny_cpu.yaml"}


@pytest.mark.parametrize("recipe", PROLONG, ids=lambda p: p.stem)
def test_prolong_recipes_pass_the_training_validation(recipe, tmp_path, capsys):
    """Their datasets (empty files: only their presence is checked) and initial weights in
    place, at the smallest world size their layout allows (one data-parallel rank)."""
    run = load(RunConfig, recipe)
    data_root = tmp_path / "data"
    for domain in run.data.mixture_spec().domains:
        for path in domain.paths:
            prefix = Path(resolve_prefix(path, str(data_root)))
            prefix.parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".bin", ".idx"):
                prefix.with_name(prefix.name + suffix).write_bytes(b"")
    weights = tmp_path / "init"
    (weights / "model").mkdir(parents=True)
    # The weights the recipe's stage starts from: its own model, at least as long as its sequences
    # (a recipe that leaves the length to the checkpoint, as sft_64k does, starts from a stage of it).
    model = presets.resolve(run.model)
    write_model_config(weights, dataclasses.replace(
        model, max_position_embeddings=max(model.max_position_embeddings, run.data.seq_length)))
    world = run.parallel.model_parallel_size
    assert main(["train", str(recipe), "--check", "--world-size", str(world),
                 f"data.data_root={data_root}", f"init.weights={weights}"]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {run.name}")


def _torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megalong", "train",
               str(EXAMPLES / "tiny_cpu.yaml"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=out, env=env)


def test_tiny_cpu_trains_on_the_quickstart_data(quickstart_run, tmp_path):
    out, _ = quickstart_run
    result = _torchrun(out, "data.data_root=data", "schedule.train_steps=3", "schedule.lr_warmup_steps=1",
                       f"checkpoint.save_dir={tmp_path / 'run'}", "checkpoint.save_interval=0")
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(read_losses(tmp_path / "run" / "metrics.jsonl")) == [1, 2, 3]


def test_a_configuration_error_is_one_line_not_a_traceback_per_rank(quickstart_run, tmp_path):
    out, _ = quickstart_run
    result = _torchrun(out, f"data.data_root={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert result.stderr.count("indexed dataset(s) of the mixture not found") == 1, result.stderr[-4000:]
    assert "/megalong/" not in result.stderr.split("indexed dataset(s)")[0]  # no traceback of ours before it
    assert 'megalong/training' not in result.stderr  # nor after it
