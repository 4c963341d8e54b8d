"""The checkpoint folder format: which checkpoint a path means, and the ``latest`` marker."""

import pytest

from megalong.checkpoint import layout


def _checkpoint(directory, training: bool = True):
    (directory / layout.MODEL_SUBDIR).mkdir(parents=True)
    (directory / layout.MODEL_CONFIG_FILE).write_text("{}\n")
    if training:
        (directory / layout.TRAIN_STATE_FILE).write_text("{}\n")
    return directory


def test_a_weights_or_iteration_directory_means_itself(tmp_path):
    weights = _checkpoint(tmp_path / "converted", training=False)
    assert layout.resolve(weights) == weights
    assert layout.is_weights_dir(weights) and not layout.is_training_checkpoint(weights)
    step = _checkpoint(tmp_path / "run" / "iter_0000010")
    assert layout.resolve(step) == step and layout.is_training_checkpoint(step)


def test_a_save_directory_means_what_latest_names(tmp_path):
    save = tmp_path / "run"
    for step in (10, 20):
        _checkpoint(layout.iteration_dir(save, step))
    (save / "iter_0000030.tmp").mkdir()  # an interrupted save is not a checkpoint
    assert [p.name for p in layout.iterations(save)] == ["iter_0000010", "iter_0000020"]
    assert layout.read_latest(save) is None  # no marker yet
    layout.write_latest(save, layout.iteration_dir(save, 10))
    assert (save / "latest").read_text() == "iter_0000010\n"
    assert layout.resolve(save) == save / "iter_0000010"
    (save / "latest").write_text("20\n")  # Megatron-LM's form: a step number
    assert layout.resolve(save) == save / "iter_0000020"
    assert not list(save.glob("latest.tmp*"))


def test_a_broken_marker_or_a_stranger_path_is_named(tmp_path):
    save = tmp_path / "run"
    _checkpoint(layout.iteration_dir(save, 10))
    (save / "latest").write_text("iter_0000030\n")  # never completed
    with pytest.raises(FileNotFoundError, match=r"latest names 'iter_0000030', which is not a complete"):
        layout.resolve(save)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a megalong weights or checkpoint directory"):
        layout.resolve(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        layout.resolve(tmp_path / "nowhere")


def test_older_checkpoints_are_where_a_resume_falls_back_to(tmp_path):
    save = tmp_path / "run"
    for step in (10, 20, 30):
        _checkpoint(layout.iteration_dir(save, step))
    _checkpoint(layout.iteration_dir(save, 15), training=False)  # weights only: not resumable
    (save / "latest").write_text("iter_0000040\n")  # names a checkpoint that is gone
    assert layout.latest_target(save) == save / "iter_0000040"
    assert [p.name for p in layout.older_checkpoints(save, than=layout.latest_target(save))] == [
        "iter_0000030", "iter_0000020", "iter_0000010"]
    assert [p.name for p in layout.older_checkpoints(save, than=save / "iter_0000020")] == ["iter_0000010"]
    assert len(layout.older_checkpoints(save, than=save / "garbage")) == 3  # no step named: all of them
