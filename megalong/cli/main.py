"""The ``megalong`` command: one front door, one subcommand per job.

Each subcommand lives in its own module and is imported only when it runs, so
``megalong --help`` is instant and a missing optional dependency of one tool never
breaks another. A module registered here exposes ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("megalong.cli.info", "show versions, devices and available model presets"),
    "preprocess": ("megalong.cli.preprocess", "tokenize corpora into Megatron indexed datasets (.bin/.idx)"),
    "sft-data": ("megalong.cli.sft_data", "render chat JSONL into an SFT chat dataset (Llama-3 format)"),
    "convert": ("megalong.cli.convert", "convert checkpoints between Hugging Face and Megatron-Core"),
    "train": ("megalong.cli.train", "train a model from a YAML recipe (ProLong stages, SFT, CPU try-out)"),
    "plan": ("megalong.cli.plan", "choose TP/PP/CP/DP and recomputation that fit a context length"),
    "eval": ("megalong.cli.eval", "long-context recall tasks and perplexity by position"),
    "quickstart": ("megalong.cli.quickstart", "run every tool end to end on a small built-in corpus (start here)"),
    "submit": ("megalong.cli.submit", "render, check and submit SLURM jobs for recipes (chained stages, requeue)"),
}

# Process settings a subcommand wants from torch, which reads them once, at its first large
# allocation: they take effect only when set before torch is imported (the `megalong` command).
SUBCOMMAND_ENV: dict[str, dict[str, str]] = {
    # Conversion streams the model through freshly allocated tensors; with transparent huge
    # pages for them the kernel maps 2 MB at a time instead of 4 KB (fresh memory fills
    # about 3x faster here; benchmarks/convert.py measures the effect on conversion time).
    "convert": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalong",
        description="Long-context training of Llama-3 on Megatron-Core (the ProLong recipe).",
    )
    parser.add_argument("--log-level", default="INFO",
                        help="logging level (default: INFO); in a multi-process job ranks other than 0 "
                             "show only warnings and errors unless MEGALONG_LOG_ALL_RANKS=1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # Parse only up to the subcommand; the subcommand's own parser takes the rest.
    top_args, rest = parser.parse_known_args(argv)
    if "torch" not in sys.modules:  # otherwise too late to matter, and not ours to change
        for key, value in SUBCOMMAND_ENV.get(top_args.command, {}).items():
            os.environ.setdefault(key, value)

    from megalong.runtime.logs import setup_logging
    from megalong.runtime.warnings_filter import quiet_known_warnings

    quiet_known_warnings()
    # Under torchrun/srun: INFO from rank 0 only, warnings from every rank tagged with it.
    setup_logging(top_args.log_level)
    if top_args.command is None:
        parser.print_help()
        return 2
    module_name, help_text = SUBCOMMANDS[top_args.command]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"megalong {top_args.command}", description=help_text)
    module.add_arguments(sub_parser)
    try:
        # Options anywhere, also between positionals: `train RECIPE --print-config key=value ...`
        sub_args = sub_parser.parse_intermixed_args(rest)
    except TypeError:  # argparse cannot intermix a subcommand that has subcommands of its own
        sub_args = sub_parser.parse_args(rest)
    return int(module.run(sub_args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
