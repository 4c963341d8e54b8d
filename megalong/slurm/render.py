"""Render the sbatch templates of the repository's ``slurm/`` folder for one job.

A template is a working sbatch script: its ``#SBATCH`` lines hold example resources and a
settings block (between the two ``# --- ... ---`` markers) reads its inputs from the
environment. Rendering keeps the template's comments and body and replaces the
``#SBATCH`` lines and the settings block with this job's values, so the rendered script
is self-contained (what ``--dry-run`` prints is exactly what runs).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

SETTINGS_START = "# --- settings"
# A GPU training job's --mem unless the user gives one: 0 is "all of the node's memory".
TRAINING_NODE_MEMORY = "0"
SETTINGS_END = "# --- end of settings ---"


def templates_dir() -> Path:
    """The repository's ``slurm/`` folder (templates are files users also read and edit)."""
    folder = Path(__file__).resolve().parents[2] / "slurm"
    if not (folder / "train_srun.sbatch").is_file():
        raise FileNotFoundError(
            f"the sbatch templates are not in {folder}: megalong submit needs the repository "
            "checkout (pip install -e .), not only the installed package"
        )
    return folder


@dataclass
class JobOptions:
    """Resources and placement of one job (the ``#SBATCH`` lines)."""

    job_name: str
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU job
    procs_per_node: int = 8  # processes per node (one per GPU on GPUs)
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    qos: Optional[str] = None
    mem: Optional[str] = None
    log_dir: str = "logs/slurm"
    chdir: Optional[str] = None
    # Seconds before the time limit at which SLURM warns the job with USR1 (0: no warning).
    signal_seconds: int = 300
    extra_sbatch: Sequence[str] = field(default_factory=list)
    python: str = field(default_factory=lambda: sys.executable)

    def common_lines(self) -> list[str]:
        lines = [f"--job-name={self.job_name}"]
        for flag, value in (("partition", self.partition), ("account", self.account),
                            ("time", self.time), ("qos", self.qos), ("mem", self.mem),
                            ("chdir", self.chdir)):
            if value:
                lines.append(f"--{flag}={value}")
        return lines


def _split_template(path: Path) -> tuple[list[str], list[str]]:
    """(description comment lines, body lines after the settings block) of a template."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(SETTINGS_START))
        end = next(i for i, line in enumerate(lines) if line.startswith(SETTINGS_END))
    except StopIteration:
        raise ValueError(f"{path}: template has no '{SETTINGS_START} ...' / '{SETTINGS_END}' block") from None
    description = [line for line in lines[1:start] if line.startswith("#") and not line.startswith("#SBATCH")]
    return description, lines[end + 1:]


def _bash_array(name: str, values: Sequence[str]) -> str:
    return f"{name}=(" + " ".join(shlex.quote(str(v)) for v in values) + ")"


def _assemble(template: str, sbatch: list[str], settings: list[str], options: JobOptions) -> str:
    path = templates_dir() / template
    description, body = _split_template(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["#!/bin/bash", f"# Rendered by `megalong submit` from slurm/{template} on {stamp}."]
    out += description
    out += [f"#SBATCH {line}" for line in sbatch + list(options.extra_sbatch)]
    out.append("# --- settings of this job ---")
    out += settings
    out.append(f"PYTHON={shlex.quote(options.python)}")
    out.append(SETTINGS_END)
    out += body
    return "\n".join(out) + "\n"


def render_train(recipe: str, overrides: Sequence[str], options: JobOptions, launcher: str = "srun") -> str:
    """The sbatch script of one training stage.

    launcher ``srun``: one task per GPU/process; ``torchrun``: one torchrun per node.
    """
    if launcher not in ("srun", "torchrun"):
        raise ValueError(f"launcher must be 'srun' or 'torchrun', got {launcher!r}")
    sbatch = options.common_lines() + [f"--nodes={options.nodes}"]
    if options.gpus_per_node and not options.mem:
        # All of each node's host memory (a site's default memory per CPU is often a few GB): a
        # fully reshardable checkpoint save or load holds a whole TP x PP shard's optimizer
        # state on some processes (docs/train.md, "Checkpoint formats").
        sbatch.append(f"--mem={TRAINING_NODE_MEMORY}")
    if launcher == "srun":
        sbatch.append(f"--ntasks-per-node={options.procs_per_node}")
    else:
        sbatch.append("--ntasks-per-node=1")
    if options.gpus_per_node:
        sbatch.append(f"--gpus-per-node={options.gpus_per_node}")
    if options.cpus_per_task:
        cpus = options.cpus_per_task if launcher == "srun" else options.cpus_per_task * options.procs_per_node
        sbatch.append(f"--cpus-per-task={cpus}")
    elif launcher == "torchrun":
        sbatch.append(f"--cpus-per-task={options.procs_per_node}")
    sbatch += [f"--output={options.log_dir}/%x-%j.out", "--open-mode=append", "--requeue"]
    if options.signal_seconds:
        sbatch.append(f"--signal=B:USR1@{options.signal_seconds}")
    settings = [f"RECIPE={shlex.quote(str(recipe))}", _bash_array("TRAIN_OVERRIDES", overrides)]
    if launcher == "torchrun":
        settings.append(f"PROCS_PER_NODE={options.procs_per_node}")
    template = "train_srun.sbatch" if launcher == "srun" else "train_torchrun.sbatch"
    return _assemble(template, sbatch, settings, options)


def render_preprocess(args: Sequence[str], options: JobOptions, array_tasks: int = 0, stage: str = "tokenize") -> str:
    """A preprocessing job: an array of ``array_tasks`` tokenize tasks, or the merge job."""
    sbatch = options.common_lines() + ["--ntasks=1"]
    if options.cpus_per_task:
        sbatch.append(f"--cpus-per-task={options.cpus_per_task}")
    if array_tasks:
        sbatch += [f"--array=0-{array_tasks - 1}", f"--output={options.log_dir}/%x-%A_%a.out"]
    else:
        sbatch.append(f"--output={options.log_dir}/%x-%j.out")
    sbatch += ["--open-mode=append", "--requeue"]
    settings = [_bash_array("PREPROCESS_ARGS", args), f"STAGE={shlex.quote(stage)}"]
    return _assemble("preprocess_array.sbatch", sbatch, settings, options)


def render_convert(args: Sequence[str], options: JobOptions) -> str:
    """A single-process checkpoint conversion job (``megalong convert ARGS``)."""
    sbatch = options.common_lines() + ["--ntasks=1"]
    if options.cpus_per_task:
        sbatch.append(f"--cpus-per-task={options.cpus_per_task}")
    sbatch += [f"--output={options.log_dir}/%x-%j.out", "--open-mode=append"]
    return _assemble("convert.sbatch", sbatch, [_bash_array("CONVERT_ARGS", args)], options)
