"""Ring context parallelism: K/V blocks move between CP ranks, partial results merge by log-sum-exp.

Each CP rank keeps its own queries (two chunks of the load-balanced layout) and, step by
step, sees the keys/values of the other ranks: at step ``t`` it holds those of rank
``r - t``, received while it computed step ``t - 1`` (communication overlaps compute).

Every rank knows the whole document layout, so every rank can tell which steps matter to
anyone: a step where no rank's queries can see the keys of rank ``r - t`` (all of them in
the future, or in other documents) is skipped by all ranks together, communication
included. That is why blocks are fetched straight from rank ``r - t`` rather than passed
along hop by hop: with short documents (the common case in ProLong's mixture) only the
neighbouring ranks' blocks are needed. Inside a step, tiles are skipped the same way
(``blocks.py``).

The backward is written out (this is a ``torch.autograd.Function``; autograd never runs
through the communication): K/V are fetched again for each needed step, and the
gradient contribution to rank ``r - t``'s keys/values is sent straight back to it.
Probabilities are recomputed from the final log-sum-exp, so nothing of size S x S is
ever kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalong.model.attention import blocks
from megalong.model.attention.comm import RingExchange
from megalong.model.attention.layout import DocumentLayout

_KV_TAG, _GRAD_TAG = 1, 2


def _to_blocks(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[s, b, h, d] -> [b, kv_heads, h // kv_heads, s, d] (query heads grouped by their KV head)."""
    s, b, h, d = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, kv_heads, h // kv_heads, s, d)


def _from_blocks(x: torch.Tensor) -> torch.Tensor:
    """[b, hkv, g, s, d] -> [s, b, hkv * g, d]."""
    b, hkv, g, s, d = x.shape
    return x.reshape(b, hkv * g, s, d).permute(2, 0, 1, 3)


def _plan(layout: DocumentLayout, cp_size: int, q_rank: int, k_rank: int, tile: int) -> blocks.BlockPlan:
    """Which tiles of rank ``q_rank``'s queries see which of rank ``k_rank``'s keys (CPU, cached)."""
    def compute():
        return blocks.plan_blocks(
            layout.positions(cp_size, q_rank), layout.local_doc_ids(cp_size, q_rank),
            layout.positions(cp_size, k_rank), layout.local_doc_ids(cp_size, k_rank), tile,
        )

    return layout.cached(("block_plan", cp_size, q_rank, k_rank, tile), compute)


def needed_steps(layout: DocumentLayout, cp_size: int, tile: int) -> list:
    """Ring steps ``t`` at which some rank ``r`` sees a key of rank ``r - t`` (always includes 0)."""
    def compute():
        return [0] + [
            step for step in range(1, cp_size)
            if any(not _plan(layout, cp_size, r, (r - step) % cp_size, tile).empty for r in range(cp_size))
        ]

    return layout.cached(("ring_steps", cp_size, tile), compute)


class RingAttention(torch.autograd.Function):
    """Document-masked causal attention over a CP group (forward and backward written out)."""

    @staticmethod
    def forward(ctx, query, key, value, layout: DocumentLayout, group, softmax_scale: float, tile: int):
        cp_size = dist.get_world_size(group) if group is not None else 1
        cp_rank = dist.get_rank(group) if group is not None else 0
        kv_heads = key.shape[2]
        q = _to_blocks(query, kv_heads)
        own_kv = torch.stack([key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)]).contiguous()
        device = query.device
        q_pos = layout.positions(cp_size, cp_rank, device)
        q_doc = layout.local_doc_ids(cp_size, cp_rank, device)
        steps = needed_steps(layout, cp_size, tile)
        ring = RingExchange(group) if len(steps) > 1 else None

        acc = blocks.accumulation_dtype(query.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=device)
        pending = None
        for i, step in enumerate(steps):
            kv = own_kv if step == 0 else ring.wait(pending)
            if i + 1 < len(steps):  # fetch the next needed block while this one is computed
                pending = ring.start(own_kv, shift=steps[i + 1], tag=_KV_TAG)
            source = (cp_rank - step) % cp_size
            plan = _plan(layout, cp_size, cp_rank, source, tile)
            if not plan.empty:
                k_pos = layout.positions(cp_size, source, device)
                k_doc = layout.local_doc_ids(cp_size, source, device)
                block_out, block_lse = blocks.block_forward(
                    q, kv[0], kv[1], q_pos, q_doc, k_pos, k_doc, softmax_scale, plan
                )
                out, lse = blocks.merge_partial(out, lse, block_out, block_lse)
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
        steps = needed_steps(layout, cp_size, tile)
        ring = RingExchange(group) if len(steps) > 1 else None

        own_kv = torch.stack([key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)]).contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=device)
        own_dkv = torch.zeros(own_kv.shape, dtype=acc, device=device)
        pending = None
        for i, step in enumerate(steps):
            kv = own_kv if step == 0 else ring.wait(pending)
            if i + 1 < len(steps):
                pending = ring.start(own_kv, shift=steps[i + 1], tag=_KV_TAG)
            source = (cp_rank - step) % cp_size
            plan = _plan(layout, cp_size, cp_rank, source, tile)
            dkv = torch.zeros(own_kv.shape, dtype=acc, device=device)
            if not plan.empty:
                k_pos = layout.positions(cp_size, source, device)
                k_doc = layout.local_doc_ids(cp_size, source, device)
                dq_block, dkv[0], dkv[1] = blocks.block_backward(
                    dout, q, kv[0], kv[1], out, lse, delta, q_pos, q_doc, k_pos, k_doc, scale, plan
                )
                dq += dq_block
            if step == 0:
                own_dkv += dkv
            else:
                # This contribution belongs to rank r - step; ours arrives from rank r + step.
                own_dkv += ring.wait(ring.start(dkv, shift=-step, tag=_GRAD_TAG))

        grad_query = _from_blocks(dq).to(query.dtype)
        grad_key = own_dkv[0].permute(2, 0, 1, 3).to(key.dtype)
        grad_value = own_dkv[1].permute(2, 0, 1, 3).to(value.dtype)
        return grad_query, grad_key, grad_value, None, None, None, None


def ring_attention(query, key, value, layout: DocumentLayout, group, softmax_scale: float,
                   tile: int = blocks.DEFAULT_TILE) -> torch.Tensor:
    """q [s_local, b, hq, d], k/v [s_local, b, hkv, d] in the load-balanced CP layout -> [s_local, b, hq*d]."""
    return RingAttention.apply(query, key, value, layout, group, softmax_scale, tile)
