#!/usr/bin/env python
"""Megatron-LM-style front end to ``megalong preprocess``.

Takes the flags of Megatron-LM's ``tools/preprocess_data.py`` that apply, with Megatron's
meaning, and writes Megatron's file names: ``<output-prefix>_<key>_document.{bin,idx}``
(plus the ``.json`` sidecar). As in Megatron-LM, documents get no BOS and get an EOS only
with ``--append-eod``; ``megalong preprocess`` itself defaults to BOS + text + EOS.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model /models/llama3/tokenizer.model --append-eod \\
        --output-prefix data/corpus --workers 8

Anything else (array tasks, filters, dedup, other input formats) is a ``megalong preprocess``
flag and can be passed through after ``--``.
"""

from __future__ import annotations

import argparse
import sys

IGNORED_WITH_NOTE = {
    "--split-sentences": "sentence splitting is not supported; documents are kept whole",
    "--keep-newlines": "newlines are always kept",
}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    passthrough: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="JSONL file(s), plain/.gz/.zst, or Parquet")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="key of the text (one key)")
    parser.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer_model", default="llama3",
                        help="tiktoken/sentencepiece tokenizer.model, tokenizer.json, HF directory, or 'llama3'")
    parser.add_argument("--tokenizer-type", help="accepted for compatibility; the file format decides the backend")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOS token")
    parser.add_argument("--add-bos", action="store_true", help="start every document with BOS (not in Megatron-LM)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.{bin,idx,json}")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs at the prefix (not in Megatron-LM, which always does; "
                             "megalong refuses outputs it did not make)")
    parser.add_argument("--partitions", type=int, help="accepted for compatibility; shards are automatic")
    parser.add_argument("--log-interval", type=int, help="accepted for compatibility")
    for flag, note in IGNORED_WITH_NOTE.items():
        parser.add_argument(flag, action="store_true", help=note)
    return parser.parse_args(argv), passthrough


def megalong_argv(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    if len(args.json_keys) != 1:
        raise SystemExit(f"--json-keys: one key per run, got {args.json_keys}; run once per key")
    if args.split_sentences:
        raise SystemExit("--split-sentences is not supported: documents are kept whole")
    key = args.json_keys[0]
    argv = ["preprocess", "--input", *args.input, "--text-key", key, "--tokenizer", args.tokenizer_model,
            "--output-prefix", f"{args.output_prefix}_{key}_document", "--workers", str(args.workers)]
    if not args.add_bos:
        argv.append("--no-bos")
    if not args.append_eod:
        argv.append("--no-eos")
    if args.overwrite:
        argv.append("--overwrite")
    return argv + passthrough


def main(argv: list[str] | None = None) -> int:
    from megalong.cli.main import main as megalong_main

    args, passthrough = parse(list(sys.argv[1:] if argv is None else argv))
    return megalong_main(megalong_argv(args, passthrough))


if __name__ == "__main__":
    sys.exit(main())
