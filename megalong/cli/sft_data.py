"""``megalong sft-data``: render chat JSONL or Parquet into an SFT chat dataset (Llama-3 chat format).

Each JSONL line is ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}``;
a Parquet file has a ``messages`` column of such lists (UltraChat-200k's layout). The output ``<prefix>.bin/.idx/.json`` is what a mixture domain of
``kind: sft`` reads: one conversation per document, loss on assistant turns only.
"""

from __future__ import annotations

import json
import logging


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="chat JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet files "
                                                   "(.parquet, a messages column: UltraChat-200k's layout)")
    parser.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin, .idx, .json)")
    parser.add_argument("--tokenizer", default="llama3",
                        help="tokenizer.model / tokenizer.json / model dir, or 'llama3' (default)")
    parser.add_argument("--messages-key", default="messages", help="JSON key / Parquet column of the message list")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def run(args) -> int:
    from megalong.data.sft import ChatFormatError, write_chat_dataset
    from megalong.data.tokenizer import load_tokenizer

    log = logging.getLogger("megalong.sft-data")
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        report = write_chat_dataset(args.inputs, tokenizer, args.output,
                                    messages_key=args.messages_key, strict=args.strict)
    except ChatFormatError as err:
        log.error("%s (nothing written)", err)
        return 1
    if report.skipped:
        log.warning("skipped lines by reason: %s", json.dumps(report.skipped))
        for example in report.skipped_examples:
            log.warning("  %s", example)
    if report.conversations == 0:
        log.error("no usable conversation in the input")
        return 1
    return 0
