"""megalong.compat: which Megatron-Core releases are tested, and what each one needs.

The suite runs in two environments (.ci/run): Megatron-Core 0.16.x and the newest 0.19.x.
The tests of the installed release check the module's statements about it against the
release's real API; the decisions themselves are pure functions, tested for every case.
"""

import logging

import pytest
import yaml

from megalong import compat
from megalong.cli.main import main
from megalong.config import ConfigError
from tests.training.helpers import tiny_run


@pytest.mark.parametrize("text, expected", [
    ("0.16.1", (0, 16, 1)), ("0.19.2", (0, 19, 2)), ("0.19.0rc1", (0, 19, 0)),
    ("0.16.1+5f3a9c2", (0, 16, 1)),  # a source checkout appends its commit
    ("1.0", (1, 0, 0)),
])
def test_parse_version(text, expected):
    assert compat.parse_version(text) == expected


def test_parse_version_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="unknown"):
        compat.parse_version("unknown")


@pytest.mark.parametrize("version, tested", [
    ("0.16.1", True), ("0.16.3", True), ("0.19.2", True), ("0.19.4", True),
    ("0.16.0", False),  # older than the first tested patch of its series
    ("0.19.1", False),
    ("0.17.0", False), ("0.18.1", False),  # inside setup.py's range, but no CI run covers them
    ("0.20.0", False), ("1.0.0", False),
])
def test_which_versions_are_tested(version, tested):
    assert compat.is_tested(version) is tested
    warning = compat.untested_warning(version)
    if tested:
        assert warning is None
    else:
        assert f"Megatron-Core {version} is not a version megalong is tested with" in warning
        assert "0.16.x (from 0.16.1) and 0.19.x (from 0.19.2)" in warning


def test_the_installed_release_is_described_by_the_module():
    """What the module says about each tested series holds for the one installed here."""
    version = compat.megatron_core_version()
    series = compat.parse_version(version)[:2]
    if series not in compat.TESTED:
        pytest.skip(f"Megatron-Core {version} is not a tested series; nothing documented to check")
    assert compat.is_tested(version), f"this environment's Megatron-Core {version} is older than the tested one"
    expected = {(0, 16): {}, (0, 19): {"async_strategy": "mcore"}}[series]
    assert compat.async_save_kwargs() == expected
    assert compat.async_save_problem() is None  # both series have Megatron-Core's own writer


def test_async_writer_decision():
    # 0.16: no choice of writer; its own is the only one.
    assert compat.async_writer_problem("0.16.1", takes_async_strategy=False, own_writer_error=None) is None
    # 0.19: a choice, and Megatron-Core's own writer is still there.
    assert compat.async_writer_problem("0.19.2", takes_async_strategy=True, own_writer_error=None) is None
    # A release that dropped its own writer: refused, naming the setting and the package.
    problem = compat.async_writer_problem(
        "0.21.0", takes_async_strategy=True,
        own_writer_error=TypeError("async_strategy mcore is not supported. Available strategies: nvrx."))
    assert "checkpoint.async_save=false" in problem and "nvidia-resiliency-ext" in problem
    assert "Megatron-Core 0.21.0" in problem and "not supported" in problem


def test_an_untested_version_is_a_warning_not_an_error(caplog):
    with caplog.at_level(logging.WARNING, logger="megalong.compat"):
        compat.check_for_training(async_save=False, version="0.18.0")
    assert "Megatron-Core 0.18.0 is not a version megalong is tested with" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megalong.compat"):
        compat.check_for_training(async_save=False, log_warning=False, version="0.18.0")  # other ranks
        compat.check_for_training(async_save=True, version="0.16.1")
    assert caplog.text == ""


def test_train_warns_and_refuses_async_save_at_start_up(tmp_path, monkeypatch, caplog):
    """`megalong train` on a release whose background writer megalong cannot use: the warning
    and the refusal come before any process group or model exists, not at the first save."""
    import torch

    refusal = compat.async_writer_problem("0.21.0", True, TypeError("mcore is not supported"))
    monkeypatch.setattr(compat, "megatron_core_version", lambda: "0.21.0")
    monkeypatch.setattr(compat, "async_save_problem", lambda: refusal)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run(tmp_path, checkpoint={"save_dir": str(tmp_path / "ckpt")})))
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(recipe), "checkpoint.async_save=true"]) == 2
    assert "Megatron-Core 0.21.0 is not a version megalong is tested with" in caplog.text
    assert "set checkpoint.async_save=false" in caplog.text
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ConfigError):
        compat.check_for_training(async_save=True)


# metadata.json as each series writes it (dist_checkpointing/core.py:save_config).
WRITTEN_BY_0_16 = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
WRITTEN_BY_0_19 = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


def test_common_state_decision():
    assert compat.common_state_problem("ckpt/model", True, True, "0.16.1") is None  # 0.16 reads 0.16's
    assert compat.common_state_problem("ckpt/model", True, False, "0.19.2") is None  # 0.19 reads 0.16's
    assert compat.common_state_problem("ckpt/model", False, False, "0.19.2") is None  # 0.19 reads 0.19's
    problem = compat.common_state_problem("ckpt/model", False, True, "0.16.1")  # 0.16 cannot read 0.19's
    assert problem.startswith("ckpt/model was written by a newer Megatron-Core")
    assert "Megatron-Core 0.16.1 here cannot read" in problem and "common.pt" in problem


def _checkpoint_dir(path, metadata):
    import json

    path.mkdir()
    (path / "metadata.json").write_text(json.dumps(metadata))
    return path


def test_the_installed_release_reads_the_formats_the_module_says(tmp_path):
    series = compat.parse_version(compat.megatron_core_version())[:2]
    if series not in compat.TESTED:
        pytest.skip("not a tested series")
    assert compat.checkpoint_format_problem(_checkpoint_dir(tmp_path / "a", WRITTEN_BY_0_16)) is None
    newer = compat.checkpoint_format_problem(_checkpoint_dir(tmp_path / "b", WRITTEN_BY_0_19))
    assert (newer is not None) is (series == (0, 16))
    assert compat.checkpoint_format_problem(tmp_path / "missing") is None  # Megatron-Core names what is missing


def test_loading_a_checkpoint_this_release_cannot_read_names_it(tmp_path):
    from megalong.checkpoint.weights import CheckpointMismatchError, load_model_state

    directory = _checkpoint_dir(tmp_path / "model", WRITTEN_BY_0_19)
    if compat.checkpoint_format_problem(directory) is None:
        pytest.skip(f"Megatron-Core {compat.megatron_core_version()} reads checkpoints without common.pt")
    with pytest.raises(CheckpointMismatchError, match=f"{directory} was written by a newer Megatron-Core"):
        load_model_state([], directory)  # refused before anything is read
