"""A small training stream of real tokenized text, for the training tests.

Documents are Python standard-library source files, tokenized with the real Llama-3
tokenizer (``load_tokenizer("llama3")``). The ``test-tiny`` model has a
512-token vocabulary, so ids are mapped onto the corpus' 511 most frequent Llama-3 tokens
plus one "other" id (a restricted vocabulary of real tokens, not random data). Documents
are packed ProLong-style: concatenated, cut into samples of S + 1 tokens, the loss is
masked at each document's last token, ``cu_seqlens`` mark the documents.

``batch_for_step(step, dp_rank)`` follows the TrainStream contract: deterministic in the
step, each rank's list is its micro-batches in order.
"""

from __future__ import annotations

import functools
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from megalong.data.sample import PackedSample
from megalong.data.tokenizer import load_tokenizer
from megalong.training.batches import FixedSampleStream

STDLIB_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py",
                "heapq.py", "keyword.py", "queue.py", "sched.py", "string.py", "this.py")


@functools.lru_cache(maxsize=4)
def stdlib_documents(vocab_size: int = 512, max_doc_tokens: int = 400) -> tuple:
    """Tokenized stdlib files, each cut into documents of varied length (<= max_doc_tokens)."""
    enc = load_tokenizer("llama3")
    lib = Path(sysconfig.get_paths()["stdlib"])
    raw = [enc.encode((lib / name).read_text(encoding="utf-8")) for name in STDLIB_FILES]
    counts = Counter(t for doc in raw for t in doc)
    keep = {tok: i for i, (tok, _) in enumerate(counts.most_common(vocab_size - 1))}
    other = vocab_size - 1
    docs = []
    rng = np.random.default_rng(0)
    for doc in raw:
        ids = np.array([keep.get(t, other) for t in doc], dtype=np.int64)
        start = 0
        while start < len(ids):
            length = int(rng.integers(8, max_doc_tokens))
            docs.append(ids[start:start + length])
            start += length
    return tuple(d for d in docs if len(d) >= 2)


def pack(docs, seq_length: int, loss_masks=None) -> list[PackedSample]:
    """Pack documents back to back into samples of seq_length (+1 for the labels)."""
    tokens, doc_id, mask = [], [], []
    for i, doc in enumerate(docs):
        tokens.extend(doc.tolist())
        doc_id.extend([i] * len(doc))
        m = np.ones(len(doc), dtype=np.float32) if loss_masks is None else loss_masks[i].astype(np.float32)
        mask.extend(m.tolist())
    tokens, doc_id, mask = np.array(tokens), np.array(doc_id), np.array(mask, dtype=np.float32)
    samples = []
    for start in range(0, len(tokens) - seq_length, seq_length):
        t = tokens[start:start + seq_length + 1]
        d = doc_id[start:start + seq_length + 1]
        inputs, labels = t[:-1], t[1:]
        same_doc = d[:-1] == d[1:]
        loss_mask = mask[start + 1:start + seq_length + 1] * same_doc
        boundaries = np.flatnonzero(d[1:-1] != d[:-2]) + 1
        cu = np.concatenate([[0], boundaries, [seq_length]]).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in np.diff(cu)])
        samples.append(PackedSample(inputs.astype(np.int64), labels.astype(np.int64),
                                    loss_mask.astype(np.float32), positions.astype(np.int64), cu))
    return samples


STDLIB_SAMPLES = "packed samples of stdlib source (Llama-3 tokens, restricted vocabulary)"


def text_stream(run, data_parallel_size: int) -> FixedSampleStream:
    """data_factory for recipes: ``data_factory: tests.training.text_stream:text_stream``."""
    seq_length = run.data.seq_length
    vocab = int(run.model.vocab_size or 512)
    samples = pack(stdlib_documents(vocab), seq_length)
    return FixedSampleStream(samples, run.schedule.global_batch_size, data_parallel_size, STDLIB_SAMPLES)


def uneven_samples(seq_length: int = 64, vocab_size: int = 512) -> list[PackedSample]:
    """Four samples whose loss-token counts differ wildly (a mean of per-sequence means
    and the token average disagree on them):

    0. one document filling the sample (63 loss tokens);
    1. many 2-to-5-token documents (about half the positions are document ends);
    2. an SFT-like sample with loss on a 6-token "assistant" span only;
    3. two documents with loss on the second one only.
    """
    docs = [d for d in stdlib_documents(vocab_size) if len(d) > seq_length + 1]
    long_doc = docs[0][: seq_length + 1]
    samples = [pack([long_doc], seq_length)[0]]
    rng = np.random.default_rng(1)
    shorts, total, source = [], 0, docs[1]
    while total < seq_length + 1:
        n = int(rng.integers(2, 6))
        shorts.append(source[total:total + n])
        total += n
    samples.append(pack(shorts, seq_length)[0])
    sft_mask = np.zeros(seq_length + 1, dtype=np.float32)
    sft_mask[40:46] = 1
    samples.append(pack([docs[2][: seq_length + 1]], seq_length, [sft_mask])[0])
    first, second = docs[3][:20], docs[3][20: seq_length + 1]
    samples.append(pack([first, second], seq_length,
                        [np.zeros(len(first), np.float32), np.ones(len(second), np.float32)])[0])
    return samples


def uneven_stream(run, data_parallel_size: int) -> FixedSampleStream:
    """data_factory serving uneven_samples() as every global batch (4 samples)."""
    return FixedSampleStream(uneven_samples(run.data.seq_length), run.schedule.global_batch_size,
                             data_parallel_size, STDLIB_SAMPLES)
