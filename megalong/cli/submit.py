"""``megalong submit``: render sbatch scripts from recipes, check their layout, chain them.

    megalong submit examples/prolong/stage1_64k.yaml examples/prolong/stage2_512k.yaml \
        examples/prolong/sft.yaml --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 \
        --convert "megatron-to-hf checkpoints/prolong-sft export/prolong-8b"

Each recipe becomes one training job; jobs run one after the other (afterok dependencies),
optionally preceded by a preprocessing array + merge and followed by a conversion job.
The layout of every recipe is checked against nodes x GPUs before anything is submitted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="training recipes, run in this order (stage 1, stage 2, SFT, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.sub=value",
                        help="recipe override passed to every training stage (repeatable)")
    shape = parser.add_argument_group("job shape")
    shape.add_argument("--nodes", type=int, default=1, help="nodes per training job (default: 1)")
    shape.add_argument("--gpus-per-node", type=int, default=8,
                       help="GPUs per node, one process each (default: 8); 0 = CPU job, see --procs-per-node")
    shape.add_argument("--procs-per-node", type=int, default=None,
                       help="processes per node (default: --gpus-per-node; required for CPU jobs)")
    shape.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process")
    shape.add_argument("--launcher", choices=["srun", "torchrun"], default="srun",
                       help="srun: one task per GPU (default); torchrun: one launcher per node with a "
                            "rendezvous on the first node")
    place = parser.add_argument_group("placement (passed to sbatch)")
    place.add_argument("--partition")
    place.add_argument("--account")
    place.add_argument("--time", help="time limit per job, e.g. 24:00:00 (requeued jobs start a new limit)")
    place.add_argument("--qos")
    place.add_argument("--mem", help="memory per node, e.g. 0 for all of it")
    place.add_argument("--sbatch-arg", dest="extra_sbatch", action="append", default=[], metavar="ARG",
                       help="any other sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
    place.add_argument("--job-name", help="job name prefix (default: the recipe's name)")
    place.add_argument("--log-dir", default="logs/slurm",
                       help="job logs go to LOG_DIR/<job name>-<job id>.out (default: logs/slurm)")
    place.add_argument("--signal-seconds", type=int, default=300,
                       help="SLURM sends USR1 this many seconds before the time limit so training "
                            "checkpoints and requeues (default: 300; 0 = off)")
    place.add_argument("--after", metavar="JOBID", help="the first job waits for this existing job to succeed")
    stages = parser.add_argument_group("extra stages")
    stages.add_argument("--preprocess", metavar="ARGS",
                        help="megalong preprocess flags (quoted); runs before training as an array + merge")
    stages.add_argument("--array-tasks", type=int, default=0,
                        help="array tasks for --preprocess (default 0: one job does everything)")
    stages.add_argument("--convert", metavar="ARGS",
                        help="megalong convert arguments (quoted); runs after the last training stage")
    parser.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")


def _job_name(recipe: str, data: dict, prefix: str | None, many: bool) -> str:
    name = str(data.get("name") or Path(recipe).stem)
    if prefix:
        return f"{prefix}-{name}" if many else prefix
    return name


def run(args: argparse.Namespace) -> int:
    from megalong.config import ConfigError, LayoutError
    from megalong.slurm import JobOptions, JobShape, Stage, SubmitError, check_recipe_layout, submit_chain
    from megalong.slurm.layout import recipe_data
    from megalong.slurm.render import render_convert, render_preprocess, render_train

    if not (args.recipes or args.preprocess or args.convert):
        print("megalong submit: give at least one RECIPE, --preprocess or --convert", file=sys.stderr)
        return 2
    if args.gpus_per_node < 0:
        print(f"megalong submit: --gpus-per-node must be >= 0, got {args.gpus_per_node}", file=sys.stderr)
        return 2
    procs = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if args.gpus_per_node and procs != args.gpus_per_node:
        print(f"megalong submit: on GPUs there is one process per GPU: --procs-per-node {procs} != "
              f"--gpus-per-node {args.gpus_per_node}", file=sys.stderr)
        return 2
    if args.recipes and procs < 1:
        print("megalong submit: a CPU job (--gpus-per-node 0) needs --procs-per-node N", file=sys.stderr)
        return 2
    shape = JobShape(nodes=args.nodes, procs_per_node=procs, gpus_per_node=args.gpus_per_node)

    def options(name: str, **changes) -> JobOptions:
        base = dict(job_name=name, nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=procs,
                    cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                    time=args.time, qos=args.qos, mem=args.mem, log_dir=args.log_dir, chdir=os.getcwd(),
                    signal_seconds=args.signal_seconds, extra_sbatch=list(args.extra_sbatch))
        base.update(changes)
        return JobOptions(**base)

    stages: list[Stage] = []
    try:
        if args.preprocess:
            pre_args = shlex.split(args.preprocess)
            name = args.job_name or "preprocess"
            cpu_only = dict(gpus_per_node=0, nodes=1)
            if args.array_tasks:
                stages.append(Stage("preprocess-array", render_preprocess(
                    pre_args, options(name, **cpu_only), array_tasks=args.array_tasks),
                    f"{args.log_dir}/{name}-%A_<task>.out"))
                stages.append(Stage("preprocess-merge", render_preprocess(
                    pre_args, options(f"{name}-merge", **cpu_only), stage="merge"),
                    f"{args.log_dir}/{name}-merge-%j.out"))
            else:
                stages.append(Stage("preprocess", render_preprocess(pre_args, options(name, **cpu_only), stage="all"),
                                    f"{args.log_dir}/{name}-%j.out"))
        for recipe in args.recipes:
            # Every layout is checked before the first job is submitted.
            layout = check_recipe_layout(recipe, shape, args.overrides)
            name = _job_name(recipe, recipe_data(recipe, args.overrides), args.job_name, len(args.recipes) > 1)
            log.info("%s: %s as job '%s'", recipe, layout, name)
            stages.append(Stage(name, render_train(recipe, args.overrides, options(name), launcher=args.launcher),
                                f"{args.log_dir}/{name}-%j.out"))
        if args.convert:
            name = f"{args.job_name}-convert" if args.job_name else "convert"
            stages.append(Stage("convert", render_convert(shlex.split(args.convert),
                                                          options(name, gpus_per_node=0, nodes=1)),
                                f"{args.log_dir}/{name}-%j.out"))
    except (LayoutError, ConfigError) as err:
        print(f"megalong submit: refused, nothing was submitted: {err}", file=sys.stderr)
        return 2

    if args.dry_run:
        for index, stage in enumerate(stages):
            if index:
                after = f"starts after job {index} of this chain succeeds"
            else:
                after = f"starts after existing job {args.after} succeeds" if args.after else "no dependency"
            print(f"##### job {index + 1} of {len(stages)}: {stage.name} ({after}) #####")
            print(stage.script)
        return 0

    Path(args.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM cannot create it, and fails silently
    try:
        submit_chain(stages, Path(args.log_dir) / "scripts", after=args.after)
    except SubmitError as err:
        print(f"megalong submit: {err}", file=sys.stderr)
        return 1
    return 0
