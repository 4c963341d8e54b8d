"""Checkpoints: resume at another layout (optimizer included), new stages, atomic layout."""

import json

import pytest
import yaml

from megalong.runtime.launch import run_processes
from megalong.training.checkpoint import prune_checkpoints, read_latest
from tests.training.helpers import in_sequence, read_losses, tiny_run, train_from_dict


def _run(workdir, name, **sections):
    base = dict(init={"weights": str(workdir / "initial-weights")},
                schedule={"train_steps": 4, "global_batch_size": 4, "lr_warmup_steps": 1})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_run(workdir / name, **base)


def test_resume_at_a_different_tensor_and_pipeline_layout(workdir, initial_weights):
    """Save at TP=2 (step 2), resume at PP=2 with 2 virtual stages; losses as uninterrupted."""
    save_dir = workdir / "reshard" / "checkpoints"
    tp2 = _run(workdir, "reshard", parallel={"tensor_parallel": 2},
               checkpoint={"save_dir": str(save_dir), "save_interval": 2, "keep_last": 0})
    assert run_processes(train_from_dict, 2, (tp2,)) == [0, 0]
    uninterrupted = read_losses(workdir / "reshard" / "metrics.jsonl")
    # Point `latest` back at step 2 and continue from there at another layout.
    (save_dir / "latest").write_text("iter_0000002\n")
    pp2 = _run(workdir, "reshard-pp2", parallel={"pipeline_parallel": 2, "virtual_pipeline": 2},
               checkpoint={"save_dir": str(save_dir), "save_interval": 2, "keep_last": 0})
    assert run_processes(train_from_dict, 2, (pp2,)) == [0, 0]
    resumed = read_losses(workdir / "reshard-pp2" / "metrics.jsonl")
    assert sorted(resumed) == [3, 4]  # it did not redo steps 1-2
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5)

    final = save_dir / "iter_0000004"
    state = json.loads((final / "train_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 16 and state["layout"].startswith("tp1,pp2")
    assert {p.name for p in final.iterdir()} >= {"model", "model.yaml", "optimizer", "rng", "run.yaml"}
    assert read_latest(save_dir) == final
    assert not list(save_dir.glob("*.tmp*"))


def test_stage_two_starts_from_stage_one_with_new_theta_and_length(workdir, initial_weights):
    """Stage 2 = stage 1's final checkpoint, RoPE theta 1.28e8, longer sequences, new schedule;
    carrying the optimizer state changes the result, and it is loaded, not ignored."""
    stage1 = _run(workdir, "stage1", checkpoint={"save_dir": str(workdir / "stage1" / "ckpt")},
                  schedule={"train_steps": 2})
    stage1_final = str(workdir / "stage1" / "ckpt" / "iter_0000002")
    stage2 = {
        carry: _run(
            workdir, f"stage2-{carry}", model={"rope_theta": 1.28e8}, data={"seq_length": 128},
            init={"weights": stage1_final, "load_optimizer": carry},
            checkpoint={"save_dir": str(workdir / f"stage2-{carry}" / "ckpt")},
            schedule={"train_steps": 2, "lr_warmup_steps": 0},
        )
        for carry in (True, False)
    }
    codes = run_processes(in_sequence, 1, ([(train_from_dict, (stage1,)), (train_from_dict, (stage2[True],)),
                                            (train_from_dict, (stage2[False],))],))
    assert codes == [[0, 0, 0]]
    carried = read_losses(workdir / "stage2-True" / "metrics.jsonl")
    fresh = read_losses(workdir / "stage2-False" / "metrics.jsonl")
    assert sorted(carried) == [1, 2]  # a new schedule from step 0
    assert carried[1] == pytest.approx(fresh[1], rel=1e-9)  # same weights before the first update
    assert abs(carried[2] - fresh[2]) > 1e-4  # Adam moments carried over vs started fresh
    saved = yaml.safe_load((workdir / "stage2-True" / "ckpt" / "iter_0000002" / "model.yaml").read_text())
    assert saved["rope_theta"] == 1.28e8 and saved["num_layers"] == 4


def test_prune_keeps_the_newest_and_latest_marker(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"iter_{step:07d}").mkdir()
        (tmp_path / f"iter_{step:07d}" / "train_state.json").write_text("{}")
    (tmp_path / "iter_0000008.tmp").mkdir()  # an interrupted save is not a checkpoint
    (tmp_path / "latest").write_text("iter_0000006\n")
    assert prune_checkpoints(tmp_path, keep_last=2) == ["iter_0000002"]
    assert read_latest(tmp_path) == tmp_path / "iter_0000006"
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match="iter_0000009"):
        read_latest(tmp_path)
