"""Real training data for the resume tests: corpora written as files, turned into indexed
datasets by the ``megalong preprocess`` and ``megalong sft-data`` commands, and recipes that
train ``test-tiny`` on them through megalong's own stream (mixtures of long, concat and sft
domains), not the test stream.

The texts are Python standard-library sources and docstrings. The tokenizer is a real
Hugging Face ``tokenizer.json``: byte-level (one token per UTF-8 byte, as GPT-2's byte-level
BPE before any merge) plus the Llama-3 special tokens the chat format needs, 261 ids in all,
so the ``test-tiny`` model (512-token vocabulary) trains on the datasets as written. The
Llama-3 tokenizer would need a 128,256-row output layer: a hundred times the cost per step.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
BOOKS = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")  # whole files: long documents
WEB = ("heapq.py", "sched.py", "string.py", "queue.py")  # cut at blank lines: short documents
SEQ_LENGTH, SFT_SEQ_LENGTH = 64, 256


def write_byte_tokenizer(directory: Path) -> Path:
    """A byte-level tokenizer.json (+ tokenizer_config.json naming BOS and EOS) in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1]}), encoding="utf-8")
    return directory


def _stdlib(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _conversations() -> list[dict]:
    """Short question-and-answer chats from the docstrings of standard-library functions."""
    chats = []
    for name in BOOKS + WEB:
        for node in ast.walk(ast.parse(_stdlib(name))):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                answer = ast.get_docstring(node).split("\n\n")[0][:150]
                chats.append({"messages": [
                    {"role": "user", "content": f"What does {node.name} in {name} do?"},
                    {"role": "assistant", "content": answer}]})
    return chats


def commands(root: Path) -> list[list[str]]:
    """Write the corpora and the tokenizer under ``root``; return the ``megalong`` command
    lines (arguments of :func:`megalong.cli.main.main`) that build the datasets."""
    tokenizer = str(write_byte_tokenizer(root / "tokenizer"))
    books = _jsonl(root / "corpus" / "books.jsonl", [{"text": _stdlib(n)} for n in BOOKS])
    web = _jsonl(root / "corpus" / "web.jsonl",
                 [{"text": part} for n in WEB for part in _stdlib(n).split("\n\n") if len(part) > 20])
    chat = _jsonl(root / "corpus" / "chat.jsonl", _conversations())
    data = root / "data"
    return [
        ["preprocess", "--input", str(books), "--output-prefix", str(data / "books"), "--tokenizer", tokenizer,
         "--workers", "1"],
        ["preprocess", "--input", str(web), "--output-prefix", str(data / "web"), "--tokenizer", tokenizer,
         "--workers", "1"],
        ["sft-data", str(chat), "--output", str(data / "chat"), "--tokenizer", tokenizer],
    ]


def build(root: str) -> list[int]:
    """Entry point for run_processes (one process): run the ``megalong`` commands of
    :func:`commands` (at this process's log level); their exit codes."""
    import logging

    from megalong.cli.main import main

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [main(["--log-level", level, *argv]) for argv in commands(Path(root))]


def _recipe(root: Path, run_dir: Path, domains: list[dict], seq_length: int, **sections) -> dict:
    from tests.training.helpers import merge

    run = {
        "name": "real-data",
        "seed": 1234,
        "model": {"preset": "test-tiny", "transformer_impl": "local"},
        "data": {"data_root": str(root / "data"), "seq_length": seq_length, "seed": 7, "domains": domains},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1, "clip_grad": 1.0},
        "schedule": {"train_steps": 8, "global_batch_size": 4, "micro_batch_size": 1, "lr_warmup_steps": 1},
        "checkpoint": {"save_dir": None},
        "logging": {"metrics_file": str(run_dir / "metrics.jsonl"), "log_samples": True},
        "runtime": {"device": "cpu"},
    }
    return merge(run, sections)


def mixture_run(root: Path, run_dir: Path, **sections) -> dict:
    """Eight steps on a mixture of a long domain (whole files cut into sequence-long chunks)
    and a concat domain (short documents packed), each step's samples logged."""
    domains = [{"name": "books", "kind": "long", "weight": 1.0, "paths": ["books"]},
               {"name": "web", "kind": "concat", "weight": 1.0, "paths": ["web"]}]
    return _recipe(root, run_dir, domains, SEQ_LENGTH, **sections)


def sft_run(root: Path, run_dir: Path, **sections) -> dict:
    """Eight steps of SFT on the chat dataset (conversations packed, loss on answers only), in
    bf16 as real SFT runs (its killed and resumed run is then the bf16 exact-resume check)."""
    from tests.training.helpers import merge

    domains = [{"name": "chat", "kind": "sft", "weight": 1.0, "paths": ["chat"]}]
    return _recipe(root, run_dir, domains, SFT_SEQ_LENGTH, **merge({"model": {"params_dtype": "bf16"}}, sections))
