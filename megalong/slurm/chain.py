"""The chain of jobs behind ``megalong submit``: [preprocess] -> training stages -> [convert].

Every job is rendered, and every recipe's layout checked against the job's nodes x
processes, before anything is submitted: a chain is refused whole or submitted whole.
Preprocessing runs as one job, or as an array of tokenize tasks followed by a merge job;
conversion runs after the last training stage. Both are single-node CPU jobs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megalong.config import load
from megalong.slurm.layout import JobShape, check_run
from megalong.slurm.render import JobOptions, render_convert, render_preprocess, render_train
from megalong.slurm.submit import Stage, submit_chain

log = logging.getLogger(__name__)


@dataclass
class ChainRequest:
    """What to run, in order, and with which resources."""

    # Resources and placement of a training job; every job gets its own job_name.
    resources: JobOptions
    recipes: Sequence[str] = ()
    overrides: Sequence[str] = ()  # applied to every training recipe
    launcher: str = "srun"
    name_prefix: Optional[str] = None  # prefix of every job name (the only name of a single training job)
    preprocess_args: Optional[Sequence[str]] = None  # ``megalong preprocess`` arguments
    array_tasks: int = 0  # 0: preprocessing in one job
    convert_args: Optional[Sequence[str]] = None  # ``megalong convert`` arguments
    # Require the first stage's initial weights and every stage's datasets to exist now (a
    # real submission); a dry run renders the chain without them and lists what is missing.
    check_files: bool = True


def training_job_name(run_name: str, prefix: Optional[str], many: bool) -> str:
    """The recipe's ``name``, prefixed; a single stage takes the prefix alone."""
    name = run_name
    if prefix:
        return f"{prefix}-{name}" if many else prefix
    return name


def _options(request: ChainRequest, job_name: str, cpu_job: bool = False) -> JobOptions:
    if cpu_job:
        return dataclasses.replace(request.resources, job_name=job_name, gpus_per_node=0, nodes=1)
    return dataclasses.replace(request.resources, job_name=job_name)


def _preprocess_stages(request: ChainRequest) -> list[Stage]:
    args, log_dir = list(request.preprocess_args), request.resources.log_dir
    name = request.name_prefix or "preprocess"
    if not request.array_tasks:
        script = render_preprocess(args, _options(request, name, cpu_job=True), stage="all")
        return [Stage("preprocess", script, f"{log_dir}/{name}-%j.out")]
    tokenize = render_preprocess(args, _options(request, name, cpu_job=True), array_tasks=request.array_tasks)
    merge = render_preprocess(args, _options(request, f"{name}-merge", cpu_job=True), stage="merge")
    return [Stage("preprocess-array", tokenize, f"{log_dir}/{name}-%A_<task>.out"),
            Stage("preprocess-merge", merge, f"{log_dir}/{name}-merge-%j.out")]


def _training_stage(request: ChainRequest, recipe: str, first: bool) -> Stage:
    """One recipe's job; raises LayoutError or ConfigError when the recipe cannot run as this job.

    Its datasets must exist unless the chain preprocesses them first; its initial weights
    unless an earlier stage of the chain writes them (every stage but the first)."""
    resources = request.resources
    shape = JobShape(nodes=resources.nodes, procs_per_node=resources.procs_per_node,
                     gpus_per_node=resources.gpus_per_node)
    from megalong.training.config import RunConfig

    run = load(RunConfig, recipe, request.overrides)
    layout = check_run(run, recipe, shape, check_data=request.check_files and request.preprocess_args is None,
                       check_init=request.check_files and first)
    # A recipe without a name of its own is known by its file name.
    run_name = run.name if run.name != RunConfig.name else Path(recipe).stem
    name = training_job_name(run_name, request.name_prefix, len(request.recipes) > 1)
    log.info("%s: %s as job '%s'", recipe, layout, name)
    script = render_train(recipe, request.overrides, _options(request, name), launcher=request.launcher)
    return Stage(name, script, f"{resources.log_dir}/{name}-%j.out")


def _convert_stage(request: ChainRequest) -> Stage:
    name = f"{request.name_prefix}-convert" if request.name_prefix else "convert"
    script = render_convert(list(request.convert_args), _options(request, name, cpu_job=True))
    return Stage("convert", script, f"{request.resources.log_dir}/{name}-%j.out")


def missing_files(request: ChainRequest) -> list[str]:
    """What the chain needs that is not there yet, one line each naming the recipe: the first
    stage's initial weights, and every stage's datasets unless the chain preprocesses them.
    (Later stages' initial weights are written by the stages before them.)"""
    from megalong.checkpoint.layout import resolve
    from megalong.config import ConfigError
    from megalong.training.config import RunConfig

    missing = []
    for index, recipe in enumerate(request.recipes):
        run = load(RunConfig, recipe, request.overrides)
        if index == 0 and run.init.weights:
            try:
                resolve(run.init.weights)
            except FileNotFoundError as err:
                missing.append(f"{recipe}: initial weights (init.weights): {err}")
        if request.preprocess_args is None and not run.data_factory and run.data.has_mixture:
            try:
                missing += [f"{recipe}: dataset of domain {entry}" for entry in run.data.missing_datasets()]
            except (ConfigError, FileNotFoundError) as err:
                missing.append(f"{recipe}: data.mixture: {err}")
    return missing


def build_chain(request: ChainRequest) -> list[Stage]:
    """Every job of the chain, rendered, in run order. Raises LayoutError or ConfigError (naming
    the recipe) before anything is submitted."""
    stages = _preprocess_stages(request) if request.preprocess_args is not None else []
    stages += [_training_stage(request, recipe, first=i == 0) for i, recipe in enumerate(request.recipes)]
    if request.convert_args is not None:
        stages.append(_convert_stage(request))
    return stages

