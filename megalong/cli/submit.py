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
import os
import shlex
import sys
from pathlib import Path


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
    parser.add_argument("--dry-run", action="store_true",
                        help="print the scripts, then list the initial weights and datasets that are not there "
                             "yet (exit code 2 if any); submit nothing")


def run(args: argparse.Namespace) -> int:
    from megalong.config import ConfigError
    from megalong.slurm import ChainRequest, JobOptions, SubmitError, build_chain, missing_files, submit_chain

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
    resources = JobOptions(
        job_name="megalong",  # each job of the chain gets its own name
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=procs, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, time=args.time, qos=args.qos, mem=args.mem,
        log_dir=args.log_dir, chdir=os.getcwd(), signal_seconds=args.signal_seconds,
        extra_sbatch=list(args.extra_sbatch),
    )
    request = ChainRequest(
        resources=resources, recipes=args.recipes, overrides=args.overrides, launcher=args.launcher,
        name_prefix=args.job_name, array_tasks=args.array_tasks,
        preprocess_args=shlex.split(args.preprocess) if args.preprocess else None,
        convert_args=shlex.split(args.convert) if args.convert else None,
        # A dry run shows the jobs before the weights and data land (a login node before the
        # download), and then says what is missing; a real submission requires them.
        check_files=not args.dry_run,
    )
    try:
        stages = build_chain(request)
    except ConfigError as err:  # LayoutError included
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
        missing = missing_files(request)
        if missing:
            print(f"megalong submit --dry-run: the jobs above cannot run yet: {len(missing)} file(s) they need "
                  f"are missing (a real submission is refused until they exist):", file=sys.stderr)
            for line in missing:
                print(f"  {line}", file=sys.stderr)
            return 2
        return 0
    try:
        # The scripts are kept in LOG_DIR/scripts; creating it creates the log directory, which
        # SLURM cannot (a job whose log cannot be opened fails without a word).
        submit_chain(stages, Path(args.log_dir) / "scripts", after=args.after)
    except SubmitError as err:
        print(f"megalong submit: {err}", file=sys.stderr)
        return 1
    return 0
