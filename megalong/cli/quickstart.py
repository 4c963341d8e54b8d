"""``megalong quickstart``: every megalong tool, end to end, on this machine in minutes."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megalong.quickstart.pipeline import SIZES

    parser.add_argument("--out", default="runs/quickstart",
                        help="where the corpus, datasets, checkpoints, export, eval and report go "
                             "(default: runs/quickstart); run again to resume")
    parser.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("MEGALONG_QUICKSTART_SIZE", "small"),
                        help="small (~10 minutes on 2 cores) or smoke (~2 minutes; what CI runs); default: "
                             "$MEGALONG_QUICKSTART_SIZE, else small")
    parser.add_argument("--nproc", type=int, default=2,
                        help="training processes; context parallelism spans all of them (default 2)")
    parser.add_argument("--workers", type=int, help="preprocessing workers (default: one per CPU)")
    parser.add_argument("--params-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="the precision the stages train in (default bf16, as real runs train, with fp32 master "
                             "weights in the optimizer)")


def run(args: argparse.Namespace) -> int:
    from megalong.config import ConfigError
    from megalong.quickstart.pipeline import Quickstart, QuickstartConfig, StepFailed

    config = QuickstartConfig(out_dir=args.out, size=args.size, nproc=args.nproc, workers=args.workers,
                              params_dtype=args.params_dtype)
    try:
        report = Quickstart(config).run()
    except (StepFailed, ConfigError, FileNotFoundError) as err:
        log.error("%s", err)
        log.error("fix the cause and run the same command again: finished steps are kept")
        return 1
    print()
    print(report["markdown"])
    return 0
