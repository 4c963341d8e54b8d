"""Which model an evaluation ran on, whether it is still that model, and what to call it.

A model directory is identified by its resolved path plus a fingerprint of what decides its
outputs: its configuration (``model.yaml`` and a training checkpoint's ``train_state.json``,
which holds the step, or a Hugging Face ``config.json``), and the names, sizes and
modification times of its weight files. Hashing the weights themselves would read gigabytes
on every run; a checkpoint rewritten at the same path gets new modification times (and
usually a new step), so it is evaluated again. The identity names the model's own folder in
the output directory, so cached results are reused only for the very model they came from.

Each model also gets a short label for plots and tables: its directory name, or
``<run>-step<N>`` for a training checkpoint's ``iter_XXXXXXX`` directory. Labels that would
clash take in more of their path (``a/export`` and ``b/export``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megalong.checkpoint.layout import MODEL_CONFIG_FILE, MODEL_SUBDIR, TRAIN_STATE_FILE, iteration_step

# Files of a Hugging Face directory that hold weights (a sharded export has several plus an index).
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass(frozen=True)
class ModelIdentity:
    path: str  # resolved
    kind: str  # "hf" or "megalong"
    step: Optional[int]  # a training checkpoint's step; None for other directories
    fingerprint: str
    label: str

    @property
    def folder(self) -> str:
        """This model's folder under the output directory's ``models/``: readable and unique."""
        return f"{_slug(_base_label(Path(self.path), self.step))}-{self.fingerprint[:12]}"

    def settings(self) -> dict:
        """What identifies the model in its progress file (the label does not: renaming it
        must not throw away results)."""
        return {"path": self.path, "kind": self.kind, "step": self.step, "fingerprint": self.fingerprint}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "model"


def _step(path: Path, kind: str) -> Optional[int]:
    if kind == "megalong" and (path / TRAIN_STATE_FILE).is_file():
        # Imported here: the training package costs ~1.4 s to import, which an evaluation of
        # Hugging Face models alone need not pay.
        from megalong.training.checkpoint import read_train_state

        return int(read_train_state(path).step)
    return iteration_step(path)


def _weight_files(path: Path, kind: str) -> list[Path]:
    if kind == "megalong":
        return sorted(p for p in (path / MODEL_SUBDIR).rglob("*") if p.is_file())
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_HF_WEIGHT_SUFFIXES))


def fingerprint(path: Path, kind: str) -> str:
    """A hash of the model's configuration files and its weight files' names, sizes and times."""
    digest = hashlib.sha256(json.dumps({"path": str(path), "kind": kind}).encode())
    config_files = (MODEL_CONFIG_FILE, TRAIN_STATE_FILE) if kind == "megalong" else ("config.json",)
    for name in config_files:
        if (path / name).is_file():
            digest.update(f"{name}\0".encode() + (path / name).read_bytes() + b"\0")
    for file in _weight_files(path, kind):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _is_iteration(path: Path) -> bool:
    return iteration_step(path) is not None and bool(path.parent.name)


def _base_label(path: Path, step: Optional[int]) -> str:
    """``<run>-step<N>`` for a training checkpoint ``<run>/iter_*``, else the directory's name."""
    return f"{path.parent.name}-step{step}" if _is_iteration(path) else (path.name or str(path))


def _label(path: Path, step: Optional[int], extra_parents: int) -> str:
    """The base label with ``extra_parents`` more directories of the path in front."""
    parents = [p.name for p in path.parents]
    if _is_iteration(path):
        parents = parents[1:]  # the run's name is in the base label already
    prefix = [name for name in reversed(parents[:extra_parents]) if name]
    return "/".join(prefix + [_base_label(path, step)])


def _unique_labels(paths: list[Path], steps: list[Optional[int]]) -> list[str]:
    extra = [0] * len(paths)
    while True:
        labels = [_label(p, s, e) for p, s, e in zip(paths, steps, extra)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            return labels
        grown = False
        for i in clashing:
            if extra[i] < len(paths[i].parents):
                extra[i] += 1
                grown = True
        if not grown:  # identical paths are refused before this; a last resort all the same
            return [f"{label}#{i + 1}" if i in clashing else label for i, label in enumerate(labels)]


def identify_models(paths: list[str], kinds: list[str], labels: Optional[list[str]] = None) -> list[ModelIdentity]:
    """Identities of the models at ``paths`` (``kinds``: "hf" or "megalong" each), labelled with
    ``labels`` when given, else from their paths."""
    resolved = [Path(p).resolve() for p in paths]
    seen: dict[Path, str] = {}
    for given, path in zip(paths, resolved):
        if path in seen:
            raise ValueError(f"model {given} is given twice (also as {seen[path]})")
        seen[path] = given
    steps = [_step(p, k) for p, k in zip(resolved, kinds)]
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} models: give one label per model, in order")
        if len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
            raise ValueError(f"labels must be distinct and non-empty, got {labels}")
    else:
        labels = _unique_labels(resolved, steps)
    return [ModelIdentity(str(p), k, s, fingerprint(p, k), label)
            for p, k, s, label in zip(resolved, kinds, steps, labels)]
