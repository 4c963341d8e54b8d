"""Shared helpers for the preprocessing tests."""

import ctypes
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from megalong.data.preprocess import PreprocessConfig, run
from megalong.data.tokenizer import load_tokenizer

_TOKENIZER = {}


def llama3():
    if "llama3" not in _TOKENIZER:
        _TOKENIZER["llama3"] = load_tokenizer("llama3")
    return _TOKENIZER["llama3"]


def sample_texts(count=60):
    """Varied documents: prose, code, unicode, special-token look-alikes, long and short."""
    base = [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n",
        "Ünïcödé: 日本語のテキスト, emojis 🙂🚀, and math ∑x².",
        "A literal <|end_of_text|> inside text stays text.",
        "Numbers 1234567890 and\ttabs\nand\n\nnewlines.",
    ]
    return [f"{base[i % len(base)]} #{i} " + "lorem ipsum " * (i % 13) for i in range(count)]


def write_jsonl(path: Path, records, key="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record if isinstance(record, dict) else {key: record}) + "\n")
    return path


def read_dataset(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected(texts, bos=True, eos=True):
    tok = llama3()
    return [([tok.bos_id] if bos else []) + tok.encode(t) + ([tok.eos_id] if eos else []) for t in texts]


def preprocess(inputs, prefix, stage="all", **settings) -> dict | None:
    cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix), tokenizer="llama3",
                           **{"workers": 1, **settings})
    return run(cfg, llama3(), stage=stage, progress_stream=open("/dev/null", "w"))


def file_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def as_arrays(docs):
    return [np.asarray(d) for d in docs]


def drop_read_override() -> None:
    """Give up, in this process, the two capabilities that let root read any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): file modes then apply to root too. Meant for a
    child process; nothing to do for other users."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    sets = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} for capabilities 0-31, then 32-63
    if libc.capget(header, sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2
    sets[0] &= keep
    sets[1] &= keep
    if libc.capset(header, sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def in_child_process(function, *args, timeout: float = 60, read_override: bool = True, **kwargs):
    """``function(*args, **kwargs)`` in a forked child process: its result, or its exception
    raised here. A child still running after ``timeout`` seconds is killed and TimeoutError
    raised, so a hang (a reader blocked on a named pipe, in C code no signal interrupts)
    fails the test instead of stopping the suite. ``read_override=False``: the child first
    gives up root's power to read any file (drop_read_override)."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child():
        try:
            if not read_override:
                drop_read_override()
            outcome = (True, function(*args, **kwargs))
        except BaseException as err:  # sent back and raised in the test
            outcome = (False, err)
        sender.send(outcome)

    process = context.Process(target=child)  # not a daemon: it may start worker processes
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{function.__name__} still running after {timeout} s")
        succeeded, value = receiver.recv()
    finally:
        process.kill()
        process.join()
    if not succeeded:
        raise value
    return value
