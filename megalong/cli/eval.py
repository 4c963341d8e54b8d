"""``megalong eval``: long-context recall (lengths x depths) and perplexity by position,
for one model or several compared side by side.

    megalong eval MODEL_DIR --out results/ --tokenizer llama3 --lengths 1024,2048
    megalong eval HF_DIR --out results/ --ppl-data data/heldout_text_document --ppl-length 65536
    megalong eval runs/stage1/iter_0001000 runs/stage2/iter_0000500 HF_DIR --out compare/ --tokenizer llama3
    megalong eval MODEL_DIR recall.samples=8 perplexity.num_documents=16 --config eval.yaml

Flags fill the most used fields of :class:`megalong.eval.config.EvalConfig`; any field can
be set in a YAML file (``--config``) or as a ``key.sub=value`` override written among the
model directories (overrides win over flags, flags over the YAML file).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="MODEL",
                        help="megalong weights/checkpoint directories and/or Hugging Face model directories to "
                        "evaluate and compare; arguments of the form key.sub=value are config overrides "
                        "(e.g. recall.samples=8)")
    parser.add_argument("--labels", help="comma-separated short names of the models for plots and tables "
                        "(default: from their paths)")
    parser.add_argument("--out", help="output directory (results.json, plots, each model's progress under models/); "
                        "models already evaluated into it are not evaluated again")
    parser.add_argument("--config", help="YAML file of an EvalConfig")
    parser.add_argument("--tokenizer", help="tokenizer spec: tokenizer.model / tokenizer.json / directory / 'llama3'")
    parser.add_argument("--kind", choices=["auto", "hf", "megalong"], help="model directory kind (default: detected)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--prompt-format", choices=["auto", "base", "chat"],
                        help="chat = Llama-3 chat format for instruct models (auto: chat if the HF export has a chat template)")
    parser.add_argument("--tasks", help="comma-separated recall tasks (niah_single,niah_multikey,niah_multivalue,json_kv,kv_lookup); "
                        "'none' skips recall")
    parser.add_argument("--lengths", help="comma-separated prompt lengths in tokens, e.g. 4096,8192 or 4K,128K")
    parser.add_argument("--depths", help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, help="prompts per task, length and depth")
    parser.add_argument("--ppl-data", help="indexed dataset prefix of held-out long documents (enables perplexity)")
    parser.add_argument("--ppl-length", type=int, help="tokens per document for perplexity")
    parser.add_argument("--ppl-documents", type=int, help="number of documents for perplexity")
    parser.add_argument("--ppl-bucket", type=int, help="position bucket width in tokens")
    parser.add_argument("--ppl-chunk", type=int, help="positions whose logits are computed at once (memory only; "
                        "default 1024)")


def parse_length(text: str) -> int:
    """``4096``, ``4K`` (= 4096) or ``1M`` (= 1048576) tokens."""
    clean = text.strip().upper()
    scale = 1024 if clean.endswith("K") else 1024 * 1024 if clean.endswith("M") else 1
    try:
        return int(float(clean.rstrip("KM")) * scale)
    except ValueError:
        raise ValueError(f"--lengths: {text!r} is not a length in tokens (e.g. 4096, 4K, 128K)") from None


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [
        ("out", args.out), ("tokenizer", args.tokenizer), ("model_kind", args.kind),
        ("device", args.device), ("prompt_format", args.prompt_format), ("recall.samples", args.samples),
        ("perplexity.data", args.ppl_data), ("perplexity.seq_length", args.ppl_length),
        ("perplexity.num_documents", args.ppl_documents), ("perplexity.bucket_tokens", args.ppl_bucket),
        ("perplexity.chunk_tokens", args.ppl_chunk),
    ]
    overrides = [f"{key}={value}" for key, value in pairs if value is not None]
    # JSON strings are YAML scalars that stay strings, whatever a path looks like.
    models = [text for text in args.inputs if "=" not in text]
    if models:
        overrides.append(f"models={json.dumps(models)}")
    if args.labels is not None:
        overrides.append(f"labels={json.dumps([label.strip() for label in args.labels.split(',')])}")
    if args.tasks is not None:
        names = [] if args.tasks.strip().lower() == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        overrides.append(f"recall.tasks=[{','.join(names)}]")
    if args.lengths is not None:
        overrides.append(f"recall.lengths=[{','.join(str(parse_length(n)) for n in args.lengths.split(','))}]")
    if args.depths is not None:
        overrides.append(f"recall.depths=[{args.depths}]")
    return overrides


def overrides_of(args: argparse.Namespace) -> list[str]:
    """Every override, weakest first: the flags, then the positionals that look like key=value
    (an override, not a model directory)."""
    return _flag_overrides(args) + [text for text in args.inputs if "=" in text]


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from megalong.config import load
    from megalong.eval.config import EvalConfig
    from megalong.eval.evaluate import evaluate

    try:
        cfg = load(EvalConfig, args.config, overrides_of(args))
        evaluate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input (config, paths, settings that clash with a previous run): say what, no traceback.
        logging.getLogger(__name__).debug("evaluation failed", exc_info=True)
        print(f"megalong eval: error: {err}", file=sys.stderr)
        return 2
    return 0
