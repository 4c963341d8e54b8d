"""Ring context parallelism: K/V blocks travel around the CP ranks, partial results merge by log-sum-exp.

Each CP rank keeps its own queries (two chunks of the load-balanced layout) and, over
``cp`` steps, sees the keys/values of every rank: at step ``t`` it holds those of rank
``r - t`` while already sending them on to ``r + 1`` (communication overlaps compute).
A step whose key block is entirely in the future of, or in other documents than, the
local queries is skipped; inside a step, tiles are skipped the same way (``blocks.py``).

The backward is written out (this is a ``torch.autograd.Function``; autograd never runs
through the communication): K/V travel the ring again together with an accumulator of
their gradients, which arrives back at its owner after the last step. Probabilities are
recomputed from the final log-sum-exp, so nothing of size S x S is ever kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalong.model.attention import blocks
from megalong.model.attention.comm import RingExchange
from megalong.model.attention.layout import DocumentLayout


def _to_blocks(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[s, b, h, d] -> [b, kv_heads, h // kv_heads, s, d] (query heads grouped by their KV head)."""
    s, b, h, d = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, kv_heads, h // kv_heads, s, d)


def _from_blocks(x: torch.Tensor) -> torch.Tensor:
    """[b, hkv, g, s, d] -> [s, b, hkv * g, d]."""
    b, hkv, g, s, d = x.shape
    return x.reshape(b, hkv * g, s, d).permute(2, 0, 1, 3)


def _plan(layout, cp_size, q_rank, k_rank, tile, q_pos, q_doc, k_pos, k_doc) -> blocks.BlockPlan:
    return layout.cached(("block_plan", cp_size, q_rank, k_rank, tile),
                         lambda: blocks.plan_blocks(q_pos, q_doc, k_pos, k_doc, tile))


class RingAttention(torch.autograd.Function):
    """Document-masked causal attention over a CP group, ring-style (forward and backward)."""

    @staticmethod
    def forward(ctx, query, key, value, layout: DocumentLayout, group, softmax_scale: float, tile: int):
        cp_size = dist.get_world_size(group) if group is not None else 1
        cp_rank = dist.get_rank(group) if group is not None else 0
        kv_heads = key.shape[2]
        q = _to_blocks(query, kv_heads)
        kv = torch.stack([key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)]).contiguous()
        device = query.device
        q_pos = layout.positions(cp_size, cp_rank, device)
        q_doc = layout.local_doc_ids(cp_size, cp_rank, device)
        ring = RingExchange(group) if cp_size > 1 else None

        acc = blocks.accumulation_dtype(query.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=device)
        for step in range(cp_size):
            source = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                pending = ring.start(kv)
            k_pos = layout.positions(cp_size, source, device)
            k_doc = layout.local_doc_ids(cp_size, source, device)
            plan = _plan(layout, cp_size, cp_rank, source, tile, q_pos, q_doc, k_pos, k_doc)
            if not plan.empty:
                block_out, block_lse = blocks.block_forward(
                    q, kv[0], kv[1], q_pos, q_doc, k_pos, k_doc, softmax_scale, plan
                )
                out, lse = blocks.merge_partial(out, lse, block_out, block_lse)
            if step + 1 < cp_size:
                kv = ring.wait(pending)
        out = out.to(query.dtype)

        ctx.save_for_backward(query, key, value, out, lse)
        ctx.layout, ctx.group, ctx.scale, ctx.tile = layout, group, softmax_scale, tile
        ctx.cp_size, ctx.cp_rank = cp_size, cp_rank
        s, b, hq, d = query.shape
        return _from_blocks(out).reshape(s, b, hq * d)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, out, lse = ctx.saved_tensors
        layout, group, scale, tile = ctx.layout, ctx.group, ctx.scale, ctx.tile
        cp_size, cp_rank = ctx.cp_size, ctx.cp_rank
        s, b, hq, d = query.shape
        kv_heads = key.shape[2]
        device = query.device

        q = _to_blocks(query, kv_heads)
        dout = _to_blocks(grad_output.reshape(s, b, hq, d), kv_heads)
        acc = blocks.accumulation_dtype(query.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)
        q_pos = layout.positions(cp_size, cp_rank, device)
        q_doc = layout.local_doc_ids(cp_size, cp_rank, device)
        ring = RingExchange(group) if cp_size > 1 else None

        kv = torch.stack([key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)]).contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=device)
        # Gradient accumulator of the K/V block currently held; it travels with that block.
        dkv = torch.zeros(kv.shape, dtype=acc, device=device)
        for step in range(cp_size):
            source = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                pending = ring.start(kv)
            k_pos = layout.positions(cp_size, source, device)
            k_doc = layout.local_doc_ids(cp_size, source, device)
            plan = _plan(layout, cp_size, cp_rank, source, tile, q_pos, q_doc, k_pos, k_doc)
            if not plan.empty:
                dq_block, dk_block, dv_block = blocks.block_backward(
                    dout, q, kv[0], kv[1], out, lse, delta, q_pos, q_doc, k_pos, k_doc, scale, plan
                )
                dq += dq_block
                dkv[0] += dk_block
                dkv[1] += dv_block
            if cp_size > 1:
                # Pass the accumulator on: after the last step it is back at its owner.
                dkv_pending = ring.start(dkv)
                if step + 1 < cp_size:
                    kv = ring.wait(pending)
                dkv = ring.wait(dkv_pending)

        grad_query = _from_blocks(dq).to(query.dtype)
        grad_key = dkv[0].permute(2, 0, 1, 3).to(key.dtype)
        grad_value = dkv[1].permute(2, 0, 1, 3).to(value.dtype)
        return grad_query, grad_key, grad_value, None, None, None, None


def ring_attention(query, key, value, layout: DocumentLayout, group, softmax_scale: float,
                   tile: int = blocks.DEFAULT_TILE) -> torch.Tensor:
    """q [s_local, b, hq, d], k/v [s_local, b, hkv, d] in the load-balanced CP layout -> [s_local, b, hq*d]."""
    return RingAttention.apply(query, key, value, layout, group, softmax_scale, tile)
