"""Shared inputs for the attention tests: random packed boundaries and q/k/v."""

from __future__ import annotations

import torch


def random_boundaries(seq_length: int, generator: torch.Generator, style: str) -> torch.Tensor:
    """cu_seqlens for one sample.

    "mixed": a few long documents spanning CP chunks plus runs of 1-3 token documents;
    "short": only tiny documents; "single": one document (plain causal); "aligned":
    documents of 8 tokens, so boundaries fall exactly on CP chunk boundaries.
    """
    if style == "single":
        return torch.tensor([0, seq_length])
    if style == "aligned":
        return torch.arange(0, seq_length + 1, 8)
    cuts, position = [0], 0
    while position < seq_length:
        if style == "short" or torch.rand((), generator=generator) < 0.6:
            length = int(torch.randint(1, 4, (), generator=generator))
        else:
            length = int(torch.randint(seq_length // 4, seq_length // 2 + 1, (), generator=generator))
        position = min(seq_length, position + length)
        cuts.append(position)
    return torch.tensor(cuts)


def make_inputs(seq_length=64, batch=2, query_heads=4, kv_heads=2, head_dim=8, seed=0,
                styles=("mixed", "short"), dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    cu_seqlens = [random_boundaries(seq_length, generator, styles[b % len(styles)]) for b in range(batch)]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    q = randn(seq_length, batch, query_heads, head_dim)
    k = randn(seq_length, batch, kv_heads, head_dim)
    v = randn(seq_length, batch, kv_heads, head_dim)
    grad_out = randn(seq_length, batch, query_heads * head_dim)
    return cu_seqlens, q, k, v, grad_out
