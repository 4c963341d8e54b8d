"""``megalong preprocess``: tokenize corpora into Megatron-Core indexed datasets.

Examples::

    megalong preprocess --input data/*.jsonl.zst --output-prefix out/web --tokenizer llama3
    megalong preprocess --input repos/ --input-format code-repos --min-tokens 65536 \\
        --output-prefix out/code_64k --tokenizer /models/Llama-3-8B/original/tokenizer.model

In a SLURM job array every task runs ``--stage tokenize`` (its task index and count come from
SLURM_ARRAY_TASK_ID/_MIN/_COUNT, or --task-index/--num-tasks), then one job runs
``--stage merge`` with the same flags. See docs/preprocess.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("megalong.preprocess")

# flag destination -> PreprocessConfig field, for the flags that map one to one.
_FIELDS = ("inputs", "input_format", "text_key", "output_prefix", "tokenizer", "min_tokens", "max_tokens",
           "workers", "shard_size_mb", "text_suffixes", "repo_max_file_bytes", "repo_max_bytes", "repo_key",
           "repo_path_key", "repo_content_key")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--config", help="YAML file of PreprocessConfig fields; flags given here override it")
    io.add_argument("--input", "--inputs", dest="inputs", nargs="+", metavar="PATH",
                    help="files, directories or glob patterns (JSONL .jsonl/.json[.gz|.zst], Parquet, "
                         "a directory with --input-format text / code-repos / mds, or Parquet files of one "
                         "row per source file with --input-format code-repos)")
    io.add_argument("--input-format", choices=["auto", "jsonl", "parquet", "text", "code-repos", "mds"],
                    help="default auto: JSONL and Parquet by file name; 'text' = one document per file of a "
                         "directory; 'code-repos' = one document per sub-directory (repository); 'mds' = "
                         "mosaicml-streaming dataset directories (ProLong's released data): tokenized documents, "
                         "or packed samples kept as released")
    io.add_argument("--text-key", "--json-keys", dest="text_key", help="JSON key / Parquet column of the text (default: text)")
    io.add_argument("--output-prefix", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json (work files in PREFIX.work/)")
    io.add_argument("--overwrite", action="store_true", default=None,
                    help="replace outputs already at PREFIX that this run did not make (default: refuse)")
    io.add_argument("--tokenizer", help="'llama3', a tiktoken/sentencepiece tokenizer.model, a tokenizer.json or an "
                                        "HF model directory (default: llama3)")
    policy = parser.add_argument_group("document policy")
    policy.add_argument("--no-bos", dest="add_bos", action="store_false", default=None,
                        help="do not start each document with BOS (default: BOS + text + EOS)")
    policy.add_argument("--no-eos", dest="add_eos", action="store_false", default=None,
                        help="do not end each document with EOS")
    policy.add_argument("--min-tokens", type=int, help="drop documents shorter than this (BOS/EOS included)")
    policy.add_argument("--max-tokens", type=int, help="drop documents longer than this (0 = no limit)")
    policy.add_argument("--dedup", action="store_true", default=None, help="drop exact duplicate texts (first one kept)")
    policy.add_argument("--strict", action="store_true", default=None,
                        help="stop at the first bad record or unreadable file, with its file:line (default: skip, "
                             "count and report; length and dedup filters never stop a run)")
    policy.add_argument("--text-suffixes", nargs="+", metavar="SUFFIX", help="--input-format text: only these file suffixes")
    policy.add_argument("--repo-max-file-bytes", type=int, help="--input-format code-repos: leave out larger files (default 1000000)")
    policy.add_argument("--repo-max-bytes", type=int, help="--input-format code-repos: cap per repository (0 = none)")
    policy.add_argument("--repo-key", help="--input-format code-repos from Parquet rows (one per source file, as The "
                                           "Stack v1): the repository column (default max_stars_repo_name)")
    policy.add_argument("--repo-path-key", help="... the column of the file's path in the repository "
                                                "(default max_stars_repo_path)")
    policy.add_argument("--repo-content-key", help="... the column of the file's text (default content)")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, help="worker processes (default: all CPUs available)")
    run.add_argument("--shard-size-mb", type=float, help="input MB per shard, the unit of work and resume (default: automatic, ~64 shards of 1-64 MiB)")
    run.add_argument("--stage", choices=["all", "tokenize", "merge"], default="all",
                     help="all (default): tokenize then merge; in a job array: tokenize per task, then merge once")
    run.add_argument("--task-index", type=int, help="this array task, from 0 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    run.add_argument("--num-tasks", type=int, help="array tasks in all (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    run.add_argument("--keep-work", action="store_true", default=None, help="keep PREFIX.work/ after the merge")


def build_config(args: argparse.Namespace):
    from megalong.config import from_dict
    from megalong.config.loader import load_yaml
    from megalong.data.preprocess import PreprocessConfig

    data = load_yaml(args.config) if args.config else {}
    for name in _FIELDS + ("add_bos", "add_eos", "dedup", "strict", "keep_work", "overwrite"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return from_dict(PreprocessConfig, data, source=args.config or "command line")


def run(args: argparse.Namespace) -> int:
    from megalong.config import ConfigError
    from megalong.data.preprocess import IncompleteError, InputError, PlanMismatchError, array_task_from_env
    from megalong.data.preprocess import run as run_preprocess
    from megalong.data.tokenizer import TokenizerError, load_tokenizer

    try:
        cfg = build_config(args)
        if args.stage == "merge" and not cfg.inputs and cfg.output_prefix:
            from pathlib import Path

            from megalong.data.preprocess.pipeline import config_from_plan

            if Path(f"{cfg.output_prefix}.json").is_file() and not Path(cfg.work_dir).exists():
                log.info("%s is already merged: nothing to do", cfg.output_prefix)
                return 0
            # Merge with only --output-prefix: every other setting comes from the plan.
            cfg = config_from_plan(cfg.output_prefix, keep_work=cfg.keep_work, workers=cfg.workers)
        if not cfg.output_prefix:
            raise ConfigError("--output-prefix is required")
        if not cfg.inputs and args.stage != "merge":
            raise ConfigError("--input is required")
        env_index, env_count = array_task_from_env()
        task_index = args.task_index if args.task_index is not None else env_index
        num_tasks = args.num_tasks if args.num_tasks is not None else env_count
        tokenizer = load_tokenizer(cfg.tokenizer)
        policy = " + ".join((["BOS"] if cfg.add_bos else []) + ["text"] + (["EOS"] if cfg.add_eos else []))
        log.info("tokenizer %s (%s, vocab %d); documents stored as %s", cfg.tokenizer, tokenizer.kind,
                 tokenizer.vocab_size, policy)
        sidecar = run_preprocess(cfg, tokenizer, stage=args.stage, task_index=task_index, num_tasks=num_tasks)
    except (ConfigError, TokenizerError, InputError, PlanMismatchError, IncompleteError, ValueError) as err:
        # BadInputError (strict mode) is a ValueError: its message starts with file:line.
        log.error("%s", err)
        return 1
    except OSError as err:  # unreadable tokenizer, unwritable output directory, full disk, ...
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: finished shards are kept; rerun the same command to resume")
        return 130
    if sidecar is not None:
        _print_summary(cfg.output_prefix, sidecar)
    return 0


def _print_summary(prefix: str, sidecar: dict) -> None:
    from megalong.data.preprocess.report import REASONS, REPO_FILE_REASONS, format_location

    if sidecar.get("kind") == "packed":
        print(f"wrote {prefix}.bin/.idx: {sidecar['documents']:,} packed samples of {sidecar['min_length']}.."
              f"{sidecar['max_length']} tokens, {sidecar['spans']:,} documents in them, {sidecar['tokens']:,} tokens"
              f"{', with the loss mask' if sidecar.get('loss_mask') else ''}; details in {prefix}.json")
    else:
        print(f"wrote {prefix}.bin/.idx: {sidecar['documents']:,} documents, {sidecar['tokens']:,} tokens "
              f"(lengths {sidecar['min_length']}..{sidecar['max_length']}); details in {prefix}.json")
    if sidecar["skipped_total"]:
        print(f"skipped {sidecar['skipped_total']:,} records:")
        for reason, count in sidecar["skipped"].items():
            example = next((e for e in sidecar["skip_examples"] if e["reason"] == reason), None)
            where = f" e.g. {format_location(example)}" if example else ""
            print(f"  {count:>10,}  {reason}: {REASONS.get(reason, reason)}{where}")
    if sidecar.get("repo_files_skipped"):
        print("files left out of repository documents:")
        for reason, count in sidecar["repo_files_skipped"].items():
            example = next((e for e in sidecar.get("repo_file_examples", []) if e["reason"] == reason), None)
            where = f" e.g. {example['path']}" if example else ""
            print(f"  {count:>10,}  {reason}: {REPO_FILE_REASONS.get(reason, reason)}{where}")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="megalong preprocess")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
