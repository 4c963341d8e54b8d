"""Ulysses (all-to-all) context parallelism, as ProLong used.

Before attention, one all-to-all turns "every rank holds S / cp tokens of all heads"
into "every rank holds all S tokens of h / cp heads"; any single-device document-masked
kernel then runs unchanged; a second all-to-all turns the output back. Both exchanges are
autograd Functions whose backward is the opposite exchange. Needs the (per-TP-rank)
number of query heads to be divisible by CP; KV heads are repeated when they are not.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from megalong.model.attention.comm import all_to_all
from megalong.model.attention.layout import DocumentLayout, rank_concat_order
from megalong.model.config import all_to_all_heads_problem


def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[s, b, h, d] (local tokens, all heads) -> [cp * s, b, h / cp, d] (all tokens in rank order)."""
    cp = dist.get_world_size(group)
    s, b, h, d = x.shape
    send = x.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    return all_to_all(send, group).reshape(cp * s, b, h // cp, d)


def _heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`_sequence_to_heads`."""
    cp = dist.get_world_size(group)
    total, b, hl, d = x.shape
    s = total // cp
    received = all_to_all(x.reshape(cp, s, b, hl, d).contiguous(), group)
    return received.permute(1, 2, 0, 3, 4).reshape(s, b, cp * hl, d)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad.contiguous(), ctx.group), None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad.contiguous(), ctx.group), None


def kv_repeat_for(kv_heads: int, query_heads: int, cp_size: int) -> int:
    """How often each KV head must be repeated so that KV heads split evenly over CP ranks.
    (Preflight refuses the query-head counts that do not split, with the same message.)"""
    problem = all_to_all_heads_problem(query_heads, cp_size)
    if problem:
        raise ValueError(problem)
    return cp_size // math.gcd(kv_heads, cp_size)


def _orders(seq_length: int, cp: int, device):
    order = rank_concat_order(seq_length, cp).to(device)  # rank-order index -> position
    return order, torch.argsort(order)  # and position -> rank-order index


def ulysses_attention(query, key, value, layout: DocumentLayout, group,
                      local_attention: Callable[..., torch.Tensor]) -> torch.Tensor:
    """q [s_local, b, hq, d], k/v [s_local, b, hkv, d] (load-balanced CP layout) -> [s_local, b, hq*d].

    ``local_attention(q, k, v, layout)`` is a single-device kernel on natural-order sequences.
    """
    cp = dist.get_world_size(group)
    s_local, b, hq, d = query.shape
    repeat = kv_repeat_for(key.shape[2], hq, cp)
    if repeat > 1:
        key = key.repeat_interleave(repeat, dim=2)
        value = value.repeat_interleave(repeat, dim=2)

    order, natural = layout.cached(("ulysses_order", cp, str(query.device)),
                                   lambda: _orders(layout.seq_length, cp, query.device))

    def gather(x):
        return _SequenceToHeads.apply(x, group).index_select(0, natural)

    out = local_attention(gather(query), gather(key), gather(value), layout)  # [S, b, hq/cp * d]
    out = out.reshape(layout.seq_length, b, hq // cp, d).index_select(0, order)
    return _HeadsToSequence.apply(out, group).reshape(s_local, b, hq * d)
