"""The checkpoint folder format, and which checkpoint a path means.

Every tool that reads or writes checkpoints asks this module; nothing else knows the
names below. Two kinds of directory hold weights:

* a **weights directory** (``megalong convert hf-to-megatron`` output)::

      <dir>/model/          Megatron-Core dist_checkpointing of the model (any TP/PP/CP/DP)
      <dir>/model.yaml      the resolved ModelConfig the weights belong to

* a **training checkpoint** ``<save_dir>/iter_0001000/``: a weights directory plus
  ``optimizer/``, ``rng/rank_*.pt``, ``train_state.json``, ``run.yaml`` and
  ``checksums.json`` (every file's size and CRC-32, recorded before the checkpoint is
  published and verified before it is loaded: :mod:`megalong.checkpoint.checksums`;
  see :mod:`megalong.training.checkpoint`).

A save directory holds ``iter_*`` checkpoints and a ``latest`` marker naming the newest
complete one (``iter_0001000``; a bare step number, as Megatron-LM writes, is accepted).
Checkpoints are written under ``<name>.tmp`` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional

import yaml

from megalong.config.loader import from_dict
from megalong.model.config import ModelConfig

MODEL_SUBDIR = "model"
MODEL_CONFIG_FILE = "model.yaml"
OPTIMIZER_SUBDIR = "optimizer"
RNG_SUBDIR = "rng"
TRAIN_STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "run.yaml"
CHECKSUMS_FILE = "checksums.json"
LATEST_FILE = "latest"
_ITERATION_NAME = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def staging_dir(final: str | Path) -> Path:
    """The temporary sibling a checkpoint is written into before its rename.

    The same name on every rank (no pid): all ranks write into one directory."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def iteration_step(path: str | Path) -> Optional[int]:
    """The step of an ``iter_*`` directory name, None for any other name."""
    match = _ITERATION_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def iterations(save_dir: str | Path) -> list[Path]:
    """The ``iter_*`` checkpoint directories of ``save_dir`` (renamed into place), oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(iteration_step(p), p) for p in save_dir.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def older_checkpoints(save_dir: str | Path, than: str | Path) -> list[Path]:
    """The training checkpoints of ``save_dir`` older than the checkpoint named ``than`` (which
    need not exist), newest first: where a resume falls back to. All of them when ``than`` is
    no ``iter_*`` name."""
    step = iteration_step(than)
    return [p for p in reversed(iterations(save_dir))
            if (step is None or iteration_step(p) < step) and is_training_checkpoint(p)]


def is_weights_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_CONFIG_FILE).is_file() and (path / MODEL_SUBDIR).is_dir()


def is_training_checkpoint(path: str | Path) -> bool:
    return is_weights_dir(path) and (Path(path) / TRAIN_STATE_FILE).is_file()


def has_optimizer_state(path: str | Path) -> bool:
    return (Path(path) / OPTIMIZER_SUBDIR).is_dir()


def write_latest(save_dir: str | Path, checkpoint: str | Path) -> None:
    """Point ``latest`` at ``checkpoint`` (atomically: a temporary file renamed)."""
    marker = Path(save_dir) / LATEST_FILE
    tmp = marker.with_name(f"{marker.name}.tmp-{os.getpid()}")
    tmp.write_text(Path(checkpoint).name + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def latest_target(save_dir: str | Path) -> Optional[Path]:
    """The path the ``latest`` marker of ``save_dir`` names, whatever is there; None without a marker."""
    marker = Path(save_dir) / LATEST_FILE
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    return Path(save_dir) / (f"iter_{int(name):07d}" if name.isdigit() else name)


def read_latest(save_dir: str | Path) -> Optional[Path]:
    """The checkpoint the ``latest`` marker of ``save_dir`` names; None without a marker.

    A marker naming something that is not a complete checkpoint is an error that says so."""
    target = latest_target(save_dir)
    if target is not None and (iteration_step(target) is None or not is_weights_dir(target)):
        raise FileNotFoundError(f"{Path(save_dir) / LATEST_FILE} names {target.name!r}, which is not a "
                                f"complete checkpoint in {save_dir}")
    return target


def resolve(path: str | Path) -> Path:
    """Which checkpoint ``path`` means: a weights directory or an ``iter_*`` checkpoint is
    itself; a save directory means the checkpoint its ``latest`` marker names."""
    path = Path(path)
    if is_weights_dir(path):
        return path
    latest = read_latest(path) if path.is_dir() else None
    if latest is not None:
        return latest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"{path} is not a megalong weights or checkpoint directory: a weights or iter_* directory has "
        f"{MODEL_CONFIG_FILE} and {MODEL_SUBDIR}/, a save directory has a {LATEST_FILE} marker"
    )


def write_model_config(directory: str | Path, model: ModelConfig) -> None:
    path = Path(directory) / MODEL_CONFIG_FILE
    path.write_text(yaml.safe_dump(dataclasses.asdict(model), sort_keys=False), encoding="utf-8")


def read_model_config(directory: str | Path) -> ModelConfig:
    """The model.yaml of the checkpoint ``directory`` means (see :func:`resolve`)."""
    path = resolve(directory) / MODEL_CONFIG_FILE
    return from_dict(ModelConfig, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))
