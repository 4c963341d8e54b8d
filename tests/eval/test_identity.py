"""Model identities: labels from paths, and fingerprints that change with the model."""

import dataclasses
import json
import os

import pytest

from megalong.eval.identity import identify_models
from megalong.training.checkpoint import TrainState


def _megalong_dir(path, step=None, config="preset: llama3-tiny\n"):
    (path / "model").mkdir(parents=True)
    (path / "model.yaml").write_text(config)
    (path / "model" / "__0_0.distcp").write_bytes(b"weights")
    if step is not None:
        (path / "train_state.json").write_text(json.dumps(dataclasses.asdict(TrainState(step=step))))
    return path


def _hf_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"vocab_size": 10}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_labels_come_from_paths_and_clashes_take_more_of_the_path(tmp_path):
    stage1 = _megalong_dir(tmp_path / "runs" / "stage1" / "iter_0000012", step=12)
    a = _hf_dir(tmp_path / "a" / "export")
    b = _hf_dir(tmp_path / "b" / "export")
    models = identify_models([str(stage1), str(a), str(b)], ["megalong", "hf", "hf"])
    assert [m.label for m in models] == ["stage1-step12", "a/export", "b/export"]
    assert [m.step for m in models] == [12, None, None]
    again = _megalong_dir(tmp_path / "other" / "stage1" / "iter_0000012", step=12)
    assert [m.label for m in identify_models([str(stage1), str(again)], ["megalong"] * 2)] == \
        ["runs/stage1-step12", "other/stage1-step12"]
    assert models[0].path == str(stage1.resolve())
    named = identify_models([str(a), str(b)], ["hf", "hf"], ["before", "after"])
    assert [m.label for m in named] == ["before", "after"]
    # The label is a name only: the model's folder and fingerprint do not depend on it.
    assert [m.folder for m in named] == [m.folder for m in models[1:]]


def test_bad_model_lists_are_refused(tmp_path):
    a = _hf_dir(tmp_path / "a")
    with pytest.raises(ValueError, match="given twice"):
        identify_models([str(a), str(tmp_path / "." / "a")], ["hf", "hf"])
    with pytest.raises(ValueError, match="1 labels for 2 models"):
        identify_models([str(a), str(_hf_dir(tmp_path / "b"))], ["hf", "hf"], ["x"])


def test_fingerprint_changes_with_config_step_and_rewritten_weights(tmp_path):
    path = _megalong_dir(tmp_path / "ckpt", step=5)

    def fingerprint():
        return identify_models([str(path)], ["megalong"])[0].fingerprint

    first = fingerprint()
    assert fingerprint() == first  # reading the model changes nothing
    (path / "train_state.json").write_text(json.dumps(dataclasses.asdict(TrainState(step=6))))
    after_step = fingerprint()
    assert after_step != first
    weights = path / "model" / "__0_0.distcp"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    after_write = fingerprint()
    assert after_write != after_step
    (path / "model.yaml").write_text("preset: llama3-8b\n")
    assert fingerprint() != after_write
    # A Hugging Face model is fingerprinted by its config.json (and its weight files).
    hf = _hf_dir(tmp_path / "hf")
    before = identify_models([str(hf)], ["hf"])[0].fingerprint
    (hf / "config.json").write_text('{"vocab_size": 11}')
    assert identify_models([str(hf)], ["hf"])[0].fingerprint != before


def test_a_save_directory_means_its_latest_checkpoint_and_a_stranger_is_named(tmp_path):
    from megalong.checkpoint import layout
    from megalong.eval.models import resolve_model

    step = layout.iteration_dir(tmp_path / "stage1", 12)
    (step / "model").mkdir(parents=True)
    (step / "model.yaml").write_text("{}\n")
    layout.write_latest(tmp_path / "stage1", step)
    assert resolve_model(tmp_path / "stage1") == (step, "megalong")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "hf") == (tmp_path / "hf", "hf")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="not a megalong weights or checkpoint directory.*nor is it a Hugging Face"):
        resolve_model(tmp_path / "other")
