"""What the checks feed the kernels: model shapes, packed documents, real text.

Document lengths are chosen to break what is easy to get wrong: one-token documents,
runs of them, lengths that are not multiples of 2 x CP (TE pads every document to one
under context parallelism), documents crossing the CP chunk boundaries, a document filling
almost a whole sample.
"""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np

from megalong.data.packing import ConcatIndex, SampleLayout, materialize
from megalong.data.sample import PackedSample
from megalong.model.config import ModelConfig

_COMMON = dict(rope_theta=500000.0, tie_word_embeddings=False, norm_epsilon=1e-5, make_vocab_size_divisible_by=128)

# The whole-model checks (backends, CP, TP x CP): Llama-3's head size 128, grouped-query
# attention (2 query heads per KV head), a vocabulary that Megatron pads (1000 -> 1024).
# 4 query / 2 KV heads leave one KV head per rank under TE's all-to-all at CP=2.
MODEL = ModelConfig(num_layers=2, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=4,
                    num_query_groups=2, vocab_size=1000, max_position_embeddings=8192, **_COMMON)
# Checkpoint portability: small, FP8-friendly (every GEMM dimension a multiple of 16), the
# same shape as the Hugging Face model the converter reads (checks.checkpoints.write_sources).
CHECKPOINT_MODEL = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                               num_query_groups=2, vocab_size=1000, max_position_embeddings=256, **_COMMON)
# FP8 against bf16 on real text: the real Llama-3 vocabulary, so the loss at initialisation is
# ln(128256) = 11.76 and what training removes from it is measurable.
FP8_MODEL = ModelConfig(num_layers=2, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                        num_query_groups=4, vocab_size=128256, max_position_embeddings=4096, **_COMMON)

# Leading document lengths of the first sample of every micro-batch: runs of one-token
# documents, odd lengths (not multiples of 2 x CP for any CP), lengths around 2 x CP.
FIRST_LENGTHS = (1, 1, 3, 1, 7, 17, 1, 1, 2, 5, 9, 33, 1)


def model_config(base: ModelConfig, **overrides) -> ModelConfig:
    return replace(base, **overrides)


def document_lengths(seq_length: int, seed: int, leading=FIRST_LENGTHS, median: float = 300.0) -> list[int]:
    """Lengths summing to ``seq_length``: ``leading``, then log-normal lengths (with the
    occasional one-token document), the last one cut to fit."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    for length in leading:
        if total + length >= seq_length:
            break
        lengths.append(length)
        total += length
    while total < seq_length:
        length = 1 if rng.random() < 0.05 else max(1, int(rng.lognormal(np.log(median), 1.0)))
        length = min(length, seq_length - total)
        lengths.append(length)
        total += length
    return lengths


def micro_batch_lengths(seq_length: int, seed: int = 0) -> list[list[int]]:
    """Micro-batch 2: many documents in one sample, one long document (and a short tail) in the other."""
    return [document_lengths(seq_length, seed), [seq_length - 13, 13]]


def synthetic_samples(lengths_per_sample: list[list[int]], vocab_size: int, seed: int) -> list[PackedSample]:
    """Packed samples of random tokens with exactly these document lengths."""
    rng = np.random.default_rng(seed)
    samples = []
    for lengths in lengths_per_sample:
        lengths = np.asarray(lengths, dtype=np.int64)
        layout = SampleLayout(np.arange(lengths.size), np.zeros(lengths.size, dtype=np.int64), lengths)
        pieces = [rng.integers(0, vocab_size, n) for n in lengths]
        samples.append(materialize(layout, pieces, None, pad_token_id=0, seq_length=int(lengths.sum())))
    return samples


@functools.lru_cache(maxsize=2)
def text_documents(min_tokens: int) -> tuple[np.ndarray, ...]:
    """Python standard-library sources (sorted by name) tokenized with the real Llama-3
    tokenizer, one document per file, until ``min_tokens`` tokens: real text, no download."""
    from megalong.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("llama3")
    documents, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
        if ids.size < 2:
            continue
        documents.append(ids)
        total += ids.size
        if total >= min_tokens:
            return tuple(documents)
    raise RuntimeError(f"the standard library holds only {total} tokens of Python source, {min_tokens} wanted")


def text_samples(documents, seq_length: int, first: int, count: int, seed: int = 0) -> list[PackedSample]:
    """Samples ``first .. first + count - 1`` of the documents laid end to end (megalong's
    ``concat`` packing: cut every ``seq_length`` tokens, boundaries kept as documents)."""
    index = ConcatIndex(np.array([d.size for d in documents]), seq_length, seed, name="gpu-check-text")
    samples = []
    for k in range(first, first + count):
        layout = index.layout(k)
        pieces = [documents[d][o:o + n] for d, o, n in zip(layout.documents, layout.offsets, layout.lengths)]
        last = documents[layout.documents[-1]]
        next_token = int(last[layout.offsets[-1] + layout.lengths[-1]]) if layout.continues else None
        samples.append(materialize(layout, pieces, next_token, pad_token_id=0, seq_length=seq_length))
    return samples


# Head size of the attention-kernel checks (Llama-3's).
HEAD_DIM = 128


def attention_layout(seq_length: int):
    """Micro-batch 2 of packed documents (see :func:`micro_batch_lengths`) as megalong's
    attention sees them."""
    import torch

    from megalong.model.attention.layout import DocumentLayout

    lengths = micro_batch_lengths(seq_length, seed=3)
    cu = [torch.tensor([0, *torch.tensor(sample).cumsum(0).tolist()]) for sample in lengths]
    return DocumentLayout.from_sample_cu_seqlens(cu, seq_length)


def attention_inputs(device, seq_length: int, query_heads: int, kv_heads: int):
    """q, k, v [s, 2, heads, HEAD_DIM] and an output gradient [s, 2, query_heads * HEAD_DIM],
    bf16, drawn the same on every rank."""
    import torch

    generator = torch.Generator().manual_seed(17)
    shapes = [(seq_length, 2, query_heads, HEAD_DIM), (seq_length, 2, kv_heads, HEAD_DIM),
              (seq_length, 2, kv_heads, HEAD_DIM), (seq_length, 2, query_heads * HEAD_DIM)]
    return [torch.randn(*s, generator=generator).to(device, torch.bfloat16) for s in shapes]


def attention_with_gradients(fn, tensors, grad):
    """[output, dq, dk, dv] of ``fn(q, k, v)`` backpropagating ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [leaf.grad.detach() for leaf in leaves]
