"""Which Megatron-Core releases megalong runs on, and what differs between them.

megalong is tested with two release series (setup.py allows the range between them):

* 0.16 (from 0.16.1): the newest series whose metadata allows Python 3.11; the main test
  environment and the README's test command use it.
* 0.19 (from 0.19.2): what recent cluster containers ship. ``.ci/run`` installs the newest
  0.19.x into a second environment and runs the model, training, conversion and checkpoint
  tests there (README, "Megatron-Core versions").

What differs between them, and where megalong meets it (this module is the only place
that knows; the rest of megalong asks it):

* Asynchronous checkpoint saving (``checkpoint.async_save``). 0.19 gave
  ``dist_checkpointing.save`` an ``async_strategy`` argument whose default, "nvrx", is
  nvidia-resiliency-ext's writer (it needs nvidia-resiliency-ext >= 0.6, which has no
  release for Python 3.11). megalong queues its background writes on Megatron-Core's own
  ``AsyncCallsQueue`` and joins the model and optimizer writes into one of Megatron-Core's
  ``AsyncRequest`` (:func:`megalong.training.checkpoint._one_after_the_other`), so it asks
  for Megatron-Core's own writer, "mcore": the only one 0.16 has, still in 0.19 (which
  calls it deprecated). :func:`async_save_kwargs` says what to pass;
  :func:`async_save_problem` refuses the setting at start-up on a release without that
  writer, instead of failing at the first save.
* The common (non-tensor) part of a distributed checkpoint. 0.16 writes it to
  ``common.pt`` and reads it only from there; 0.19 writes it inside the ``torch_dist``
  files (its ``metadata.json`` has no ``common_backend``) and reads both. So 0.19 resumes
  0.16's checkpoints, and 0.16 cannot read 0.19's: :func:`checkpoint_format_problem` says
  so, naming the checkpoint, before Megatron-Core fails on a missing ``common.pt``.
  (``megalong convert`` reads tensors through DCP itself and writes ``common.pt``: its input
  may come from either series, its output loads in both.)
* Notices 0.19 logs for its callers' code, which megalong's console drops
  (:mod:`megalong.runtime.warnings_filter`): ``GPTModel`` is deprecated in favour of
  ``HybridModel`` (GPTModel still gets critical fixes; megalong builds on it in both
  series); Megatron DDP asks callers to compute the distributed optimizer's parameter layout
  (``full_param_layout``) and computes it itself when they do not, as megalong does; the
  deprecation of Megatron-Core's own async writer (above).
* Everything else megalong uses (GPTModel's forward and loss hooks, the output layer's
  class, layer and block specs, TransformerConfig's FP8 fields, PackedSeqParams, the
  distributed optimizer's state handling, the CUDA RNG helpers the CPU path redirects)
  is the same in both series, as the tests run in both environments show.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Optional

from megalong.config.loader import ConfigError

log = logging.getLogger(__name__)

# Release series megalong is tested with -> the first release of the series tested.
TESTED = {(0, 16): (0, 16, 1), (0, 19): (0, 19, 2)}


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as "0.19.2", "0.19.0rc1" or
    "0.16.1+a1b2c3d" (a source checkout appends its git commit)."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def tested_versions_text() -> str:
    """The tested releases in words: "0.16.x (from 0.16.1) and 0.19.x (from 0.19.2)"."""
    return " and ".join(f"{_text(series)}.x (from {_text(first)})" for series, first in sorted(TESTED.items()))


@functools.lru_cache(maxsize=1)
def megatron_core_version() -> str:
    """The version of the Megatron-Core this Python imports (an installed wheel or a source
    checkout on PYTHONPATH, whichever wins), as it reports itself."""
    from megatron.core import package_info

    return package_info.__version__


def is_tested(version: str) -> bool:
    parsed = parse_version(version)
    first = TESTED.get(parsed[:2])
    return first is not None and parsed >= first


def untested_warning(version: str) -> Optional[str]:
    """A sentence for a Megatron-Core megalong is not tested with; None for a tested one."""
    if is_tested(version):
        return None
    return (f"Megatron-Core {version} is not a version megalong is tested with ({tested_versions_text()}); "
            "training goes on, but check the first steps' loss and the first checkpoint, and report problems "
            "with the output of `megalong info`")


def _save_takes_async_strategy() -> bool:
    from megatron.core import dist_checkpointing

    return "async_strategy" in inspect.signature(dist_checkpointing.save).parameters


def async_save_kwargs() -> dict:
    """Extra arguments of ``dist_checkpointing.save(..., async_sharded_save=True)``: choose
    Megatron-Core's own writer where the release offers another one (0.19)."""
    return {"async_strategy": "mcore"} if _save_takes_async_strategy() else {}


def async_writer_problem(version: str, takes_async_strategy: bool,
                         own_writer_error: Optional[BaseException]) -> Optional[str]:
    """Why ``checkpoint.async_save=true`` cannot work, or None (a pure decision).

    ``takes_async_strategy``: ``dist_checkpointing.save`` has the argument (0.19; 0.16 has
    only Megatron-Core's own writer). ``own_writer_error``: what asking that release for its
    own writer ("mcore") raised, None when it has one (0.19 does). A release without it
    writes in the background only through nvidia-resiliency-ext, whose requests megalong
    does not schedule.
    """
    if not takes_async_strategy or own_writer_error is None:
        return None
    return (f"checkpoint.async_save=true, but Megatron-Core {version} has no asynchronous checkpoint writer of "
            f"its own ({type(own_writer_error).__name__}: {own_writer_error}), and megalong does not drive the "
            "one from the package nvidia-resiliency-ext: set checkpoint.async_save=false, or use Megatron-Core "
            f"{tested_versions_text()}")


def async_save_problem() -> Optional[str]:
    """:func:`async_writer_problem` for the Megatron-Core installed here."""
    takes_async_strategy, error = _save_takes_async_strategy(), None
    if takes_async_strategy:
        from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

        try:
            torch_strategy.get_async_strategy("mcore")
        except Exception as err:  # a TypeError ("not supported"), a missing module, ...
            error = err
    return async_writer_problem(megatron_core_version(), takes_async_strategy, error)


def common_state_problem(directory: str, has_common_file: bool, reader_needs_common_file: bool,
                         version: str) -> Optional[str]:
    """Why a distributed checkpoint's common state cannot be read, or None (a pure decision).

    ``has_common_file``: the checkpoint was written with ``common.pt`` (0.16, and megalong's
    converter); ``reader_needs_common_file``: this Megatron-Core reads the common state only from
    there (0.16).
    """
    if has_common_file or not reader_needs_common_file:
        return None
    return (f"{directory} was written by a newer Megatron-Core (0.19 or later: its common state is inside the "
            f"distributed checkpoint, there is no common.pt), which Megatron-Core {version} here cannot read: "
            "load it with the Megatron-Core that wrote it (`megalong info` shows the version here). "
            "`megalong convert megatron-to-hf` reads it with either")


def checkpoint_format_problem(directory: str | Path) -> Optional[str]:
    """:func:`common_state_problem` for the distributed checkpoint ``directory`` (a ``model/`` or
    ``optimizer/`` folder) and the Megatron-Core installed here. None also when ``directory``
    has no readable ``metadata.json``: Megatron-Core's own error then names what is missing."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    try:
        written = json.loads((Path(directory) / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # The release that records no common backend is the one that stores the common state inside.
    reader_needs_common_file = "common_backend" in {f.name for f in dataclasses.fields(CheckpointingConfig)}
    return common_state_problem(str(directory), "common_backend" in written, reader_needs_common_file,
                                megatron_core_version())


def check_for_training(async_save: bool, log_warning: bool = True, version: Optional[str] = None) -> None:
    """At ``megalong train`` start-up, in the training process and before any process group:
    warn (when ``log_warning``: on one rank) about an untested Megatron-Core (``version``,
    default the installed one); refuse ``checkpoint.async_save`` where it cannot work
    (:class:`ConfigError`)."""
    warning = untested_warning(version or megatron_core_version())
    if warning and log_warning:
        log.warning("%s", warning)
    if async_save:
        problem = async_save_problem()
        if problem:
            raise ConfigError(problem)
