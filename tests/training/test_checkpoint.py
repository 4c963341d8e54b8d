"""Checkpoints: resume at another layout (optimizer included), new stages, atomic layout.

The runs themselves happen in the session fixtures (tests/training/conftest.py).
"""

import json

import pytest
import yaml

from megalong.checkpoint.layout import read_latest
from megalong.training.checkpoint import prune_checkpoints
from tests.training.helpers import REL_TOLERANCE, read_losses


def test_resume_at_a_different_tensor_and_pipeline_layout(workdir, two_process_results):
    """Saved at TP=2 (step 2), resumed at PP=2 x 2 virtual stages: the losses of steps 3-4
    equal the uninterrupted TP=2 run's (optimizer state resharded, not restarted)."""
    assert two_process_results["tp2_codes"] == [0, 0] and two_process_results["pp2_codes"] == [0, 0]
    uninterrupted = read_losses(workdir / "reshard" / "metrics.jsonl")
    resumed = read_losses(workdir / "reshard-pp2" / "metrics.jsonl")
    assert sorted(resumed) == [3, 4]  # it did not redo steps 1-2
    for step in (3, 4):
        # Another layout after the resume: rounding only (helpers.REL_TOLERANCE).
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=REL_TOLERANCE)

    save_dir = workdir / "reshard" / "checkpoints"
    final = save_dir / "iter_0000004"
    state = json.loads((final / "train_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 16 and state["layout"].startswith("tp1,pp2")
    assert {p.name for p in final.iterdir()} >= {"model", "model.yaml", "optimizer", "rng", "run.yaml"}
    assert read_latest(save_dir) == final
    assert not list(save_dir.glob("*.tmp*"))


def test_stage_two_starts_from_stage_one_with_new_theta_and_length(workdir, single_process_results):
    """Stage 2 = stage 1's final checkpoint, RoPE theta 1.28e8, longer sequences, a new
    schedule; carrying the optimizer state changes the result (it is loaded, not ignored)."""
    assert single_process_results["stage_codes"] == [0, 0, 0]
    carried = read_losses(workdir / "stage2-True" / "metrics.jsonl")
    fresh = read_losses(workdir / "stage2-False" / "metrics.jsonl")
    assert sorted(carried) == [1, 2]  # a new schedule from step 0
    assert carried[1] == pytest.approx(fresh[1], rel=1e-9)  # same weights before the first update
    assert abs(carried[2] - fresh[2]) > 1e-4  # Adam moments carried over vs started fresh
    saved = yaml.safe_load((workdir / "stage2-True" / "ckpt" / "iter_0000002" / "model.yaml").read_text())
    assert saved["rope_theta"] == 1.28e8 and saved["num_layers"] == 4


def test_prune_keeps_the_newest_and_latest_marker(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"iter_{step:07d}" / "model").mkdir(parents=True)
        (tmp_path / f"iter_{step:07d}" / "model.yaml").write_text("{}")
    (tmp_path / "iter_0000008.tmp").mkdir()  # an interrupted save is not a checkpoint
    (tmp_path / "latest").write_text("iter_0000006\n")
    assert prune_checkpoints(tmp_path, keep_last=2) == ["iter_0000002"]
    assert read_latest(tmp_path) == tmp_path / "iter_0000006"
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match="iter_0000009"):
        read_latest(tmp_path)


def test_a_checkpoint_whose_metadata_misses_stored_chunks_is_found_unloadable(tmp_path):
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from megalong.training.checkpoint import _unloadable_parts

    for sub in ("model", "optimizer"):
        dcp.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, checkpoint_id=str(tmp_path / sub), no_dist=True)
    assert _unloadable_parts(tmp_path) == []

    # What the async-save race produced: metadata whose storage index lacks written chunks.
    metadata_file = tmp_path / "optimizer" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    for index in [i for i in metadata.storage_data if i.fqn == "b"]:
        del metadata.storage_data[index]
    metadata_file.write_bytes(pickle.dumps(metadata))
    (problem,) = _unloadable_parts(tmp_path)
    assert problem.startswith("optimizer/.metadata lists 1 stored chunk") and "first: b at offset [0, 0]" in problem
    (tmp_path / "model" / ".metadata").unlink()
    assert _unloadable_parts(tmp_path)[0].startswith("model/.metadata cannot be read")


def test_prune_counts_back_from_latest_when_it_was_set_back(tmp_path):
    """A run resumed from an older checkpoint (``latest`` set back, or a fallback past a damaged
    one) keeps that one and the newer leftovers, which it replaces as it reaches their steps."""
    for step in (2, 4, 6, 8):
        (tmp_path / f"iter_{step:07d}" / "model").mkdir(parents=True)
        (tmp_path / f"iter_{step:07d}" / "model.yaml").write_text("{}")
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert prune_checkpoints(tmp_path, keep_last=1) == ["iter_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000004", "iter_0000006", "iter_0000008"]


def test_auto_saves_the_last_step_fully_reshardable_and_the_others_dp_reshardable():
    from megalong.training.checkpoint import save_format

    assert save_format("auto", 250, 5000) == "dp_reshardable"  # periodic, or on a stop signal
    assert save_format("auto", 5000, 5000) == "fully_reshardable"  # the stage's output
    assert save_format("fully_reshardable", 250, 5000) == "fully_reshardable"
    assert save_format("dp_reshardable", 5000, 5000) == "dp_reshardable"
