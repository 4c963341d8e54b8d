"""``megalong convert``: checkpoints between Hugging Face and Megatron-Core.

    megalong convert hf-to-megatron HF_DIR OUT_DIR
    megalong convert megatron-to-hf CHECKPOINT_DIR OUT_DIR --tokenizer TOKENIZER

Both directions stream (memory about one layer, not the model), keep RoPE settings
exactly, and write into a temporary directory that is renamed into place only when
complete. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("megalong.convert")


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = sub.add_parser(
        "hf-to-megatron", help="Hugging Face Llama directory -> megalong weights directory",
        description="Convert a Hugging Face Llama directory (config.json + safetensors) into a megalong "
        "weights directory (Megatron-Core distributed checkpoint + model.yaml) that loads at any TP/PP.",
    )
    to_mcore.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors)")
    to_mcore.add_argument("output", help="new megalong weights directory to create (must not exist)")

    to_hf = sub.add_parser(
        "megatron-to-hf", help="megalong weights or training checkpoint -> Hugging Face release directory",
        description="Export a megalong weights directory or training checkpoint (an iter_* directory, or a "
        "save directory with a 'latest' marker) as a Hugging Face release directory.",
    )
    to_hf.add_argument("checkpoint", help="megalong weights directory or training checkpoint directory")
    to_hf.add_argument("output", help="new release directory to create (must not exist)")
    to_hf.add_argument("--tokenizer", help="tokenizer to ship: a Hugging Face tokenizer directory, a single "
                       "tokenizer file, or 'llama3' (the bundled Llama-3 tokenizer)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="release without tokenizer files")
    to_hf.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="dtype of the released weights (default: as stored in the checkpoint)")
    to_hf.add_argument("--max-shard-size", type=_size, default="5GB",
                       help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")


def run(args: argparse.Namespace) -> int:
    from megalong.convert import convert_hf_to_megatron, convert_megatron_to_hf

    try:
        if args.direction == "hf-to-megatron":
            convert_hf_to_megatron(args.hf_dir, args.output)
        else:
            if not args.tokenizer and not args.no_tokenizer:
                log.error("give --tokenizer (directory, file or 'llama3') or --no-tokenizer")
                return 2
            convert_megatron_to_hf(args.checkpoint, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                                   max_shard_bytes=args.max_shard_size)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        log.error("conversion failed, nothing was written: %s", err)
        return 1
    return 0
