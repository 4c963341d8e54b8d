"""Attention in bf16, as every real run calls it: the inputs, the check and a control kernel.

Real runs give the attention bf16 queries, keys and values. Megatron-Core's and flash-attn's
kernels keep the softmax statistics (row maximum, log-sum-exp) and the sums of the P.V and
dS products in fp32 and round only what they hand on; megalong's kernels must do the same.
The check compares a kernel with the definition (``reference_attention``) computed in
float64 on the same bf16 values, so the only differences left are the kernel's own
roundings, which :mod:`megalong.gpucheck.tolerances` counts (``attention_forward_bound``:
the probabilities rounded to bf16 before P.V and the output rounded once, plus one rounding
per merge of a CP step; ``attention_gradient_bound``: those, dS rounded before the dQ/dK
products and the rounded gradients, plus the backward's merges). Errors are norm-wise over
each tensor (``||got - ref|| / ||ref||``).

A kernel that summed in bf16 would round once per term added: over a document of n keys its
softmax denominators and P.V sums carry about sqrt(n/3) u of error, and once a running sum
reaches 2^8 times its terms, adding one more is lost entirely. The cases hold documents of
hundreds of tokens, so such a kernel misses the bound by a wide margin:
:func:`bf16_summing_attention` is one, and the tests show the check rejects it.
"""

from __future__ import annotations

import math

import torch

from megalong.gpucheck.compare import relative_error
from megalong.gpucheck.tolerances import attention_forward_bound, attention_gradient_bound
from megalong.model.attention.reference import document_causal_mask, reference_attention
from tests.model.attention.cases import make_inputs

SEQ_LENGTH, BATCH, QUERY_HEADS, KV_HEADS, HEAD_DIM = 512, 2, 4, 2, 16
SCALE = 1.0 / math.sqrt(HEAD_DIM)


def bf16_inputs(seed: int = 0, styles=("single", "mixed")):
    """cu_seqlens and bf16 q, k, v, grad_out: one sample a single document of the whole sequence,
    the other documents of a quarter to half of it among runs of tiny ones."""
    cu_seqlens, *tensors = make_inputs(SEQ_LENGTH, BATCH, QUERY_HEADS, KV_HEADS, HEAD_DIM, seed=seed, styles=styles)
    return (cu_seqlens, *(t.to(torch.bfloat16) for t in tensors))


def reference_outputs(q, k, v, grad_out, doc_ids) -> dict:
    """The definition in float64 on the bf16 values: output and dq, dk, dv."""
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*inputs, doc_ids, SCALE)
    out.backward(grad_out.double())
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in zip("qkv", inputs)}}


def errors(got: dict, ref: dict) -> dict:
    """Norm-wise relative error of each output, and whether the kernel kept bf16."""
    return {name: relative_error(got[name], ref[name]) for name in ref}


def within_bounds(found: dict, cp: int = 1) -> list[str]:
    """The outputs whose error exceeds its bound (empty when the kernel passes)."""
    bounds = {"out": attention_forward_bound(cp), "dq": attention_gradient_bound(cp),
              "dk": attention_gradient_bound(cp), "dv": attention_gradient_bound(cp)}
    return [f"{name}: {found[name]:.2e} > {bounds[name]:.2e}" for name in bounds if not found[name] <= bounds[name]]


def run_kernel(kernel, q, k, v, grad_out) -> dict:
    """Output and input gradients of ``kernel(q, k, v)`` (bf16 in, bf16 out)."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernel(*inputs)
    if out.dtype != torch.bfloat16:
        raise AssertionError(f"the kernel returned {out.dtype} for bf16 inputs")
    out.backward(grad_out)
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in zip("qkv", inputs)}}


def bf16_summing_attention(query, key, value, doc_ids, softmax_scale):
    """The control: the definition with its softmax denominator and P.V sum accumulated in
    bf16, one key at a time (what a kernel without fp32 accumulators computes)."""
    seq, batch, heads, dim = query.shape
    group = heads // key.shape[2]
    q = query.permute(1, 2, 0, 3)
    k = key.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    v = value.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    positions = torch.arange(seq)
    allowed = document_causal_mask(positions, doc_ids, positions, doc_ids)[:, None]
    scores = (torch.matmul(q, k.transpose(-1, -2)) * softmax_scale).masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # bf16, masked keys give 0
    denominator = torch.zeros(weights.shape[:-1], dtype=torch.bfloat16)
    numerator = torch.zeros(q.shape, dtype=torch.bfloat16)
    for key_index in range(seq):  # bf16 + bf16 rounds to bf16 after every addition
        w = weights[..., key_index]
        denominator = denominator + w
        numerator = numerator + w[..., None] * v[:, :, key_index, None, :]
    out = numerator / denominator[..., None]
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
