"""Move tokens between Megatron's load-balanced CP layout and Transformer Engine's THD CP layout.

Megatron-Core shards the whole sequence into ``2 * cp`` chunks (rank r: chunks r and
2cp-1-r) and applies RoPE at the tokens' global positions. Transformer Engine's own
context parallelism for packed (THD) input wants something else: the micro-batch as one
stream of documents, each padded to a multiple of ``2 * cp`` and cut into ``2 * cp``
pieces, rank r holding pieces r and 2cp-1-r *of every document*.

This module exchanges q/k/v from the first layout into the second before TE's attention,
and the output back afterwards, with one uneven all-to-all each way (an autograd
Function whose backward is the opposite exchange). Every rank derives the whole plan
from the unsharded document boundaries, so no metadata is communicated. RoPE stays
global because it was applied before the exchange.

The plan is made once per micro-batch (cached on its :class:`DocumentLayout`) and moved to
the device in one copy (from pinned memory, without waiting, on a GPU); every layer, its
recomputation and its backward then use the device plan as it is. A copy of pageable host
memory to the device per call would stall the host at every layer (about 10 per layer
forward, again in recompute and backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megalong.data.cp_shard import load_balanced_index
from megalong.model.attention.layout import DocumentLayout


def thd_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions a CP rank keeps in TE's THD layout: pieces r and 2cp-1-r of every padded document."""
    cu = torch.as_tensor(cu_seqlens_padded).to(torch.int64).tolist()
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"document of padded length {length} is not a multiple of 2 x cp = {2 * cp_size}")
        parts.append(start + load_balanced_index(length, cp_size, cp_rank))
    return torch.cat(parts)


@dataclass(frozen=True)
class ThdPlan:
    """One rank's part of the exchange (token slots are indices into flattened buffers), on
    the host or, from :func:`thd_plan` with a device, on that device."""

    send_slots: torch.Tensor  # slots of the [s_local * b] local buffer, grouped by destination
    send_counts: list
    recv_slots: torch.Tensor  # slots of the THD buffer, grouped by source
    recv_counts: list
    thd_tokens: int  # length of this rank's THD buffer (padding included)
    cu_seqlens: torch.Tensor  # int32 real document boundaries of the flattened micro-batch
    cu_seqlens_padded: torch.Tensor  # int32 boundaries after padding to multiples of 2 * cp
    max_padded_length: int
    # Transformer Engine's pad_between_seqs, decided here on the host by TE's own rule (a
    # document before the last one was padded): left to TE, it compares the two device
    # boundary tensors (torch.equal), a host sync in every layer.
    pad_between_seqs: bool
    # A device plan's pinned host buffer, kept until the copy from it has surely finished.
    host_buffer: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


def thd_plan(layout: DocumentLayout, cp_size: int, cp_rank: int, device=None) -> ThdPlan:
    """This rank's plan for the micro-batch of ``layout``; with ``device``, on that device.
    Both are made once per micro-batch and cached on the layout, which every layer shares."""
    if device is None:
        return layout.cached(("thd_plan", cp_size, cp_rank), lambda: _host_plan(layout, cp_size, cp_rank))
    return layout.cached(("thd_plan", cp_size, cp_rank, str(device)),
                         lambda: _on_device(thd_plan(layout, cp_size, cp_rank), torch.device(device)))


def _on_device(plan: ThdPlan, device: torch.device) -> ThdPlan:
    """The plan's four index tensors in one host-to-device copy, views of it after."""
    parts = [plan.send_slots, plan.recv_slots, plan.cu_seqlens, plan.cu_seqlens_padded]
    packed = torch.cat([part.to(torch.int64) for part in parts])
    if device.type == "cuda":
        # Pinned memory lets the copy run without the host waiting; the plan keeps the pinned
        # buffer alive (below) until the copy has surely finished.
        packed = packed.pin_memory()
    moved = packed.to(device, non_blocking=device.type == "cuda")
    send, recv, cu, cu_padded = torch.split(moved, [part.numel() for part in parts])
    return ThdPlan(send, plan.send_counts, recv, plan.recv_counts, plan.thd_tokens, cu.to(torch.int32),
                   cu_padded.to(torch.int32), plan.max_padded_length, plan.pad_between_seqs, host_buffer=packed)


def _host_plan(layout: DocumentLayout, cp_size: int, cp_rank: int) -> ThdPlan:
    batch, seq = layout.batch, layout.seq_length
    cu = layout.flat_cu_seqlens().to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    padded_lengths = (lengths + 2 * cp_size - 1) // (2 * cp_size) * (2 * cp_size)
    cu_padded = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(padded_lengths, 0)])

    total = batch * seq
    # Where each real token (flat index b * S + position) sits in the load-balanced layout.
    sbhd_rank = torch.empty(total, dtype=torch.int64)
    sbhd_slot = torch.empty(total, dtype=torch.int64)
    for r in range(cp_size):
        pos = load_balanced_index(seq, cp_size, r)
        flat = (torch.arange(batch)[None, :] * seq + pos[:, None]).reshape(-1)  # (s, b) order
        sbhd_rank[flat] = r
        sbhd_slot[flat] = torch.arange(flat.numel())
    # ... and in TE's THD layout.
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    padded_position = cu_padded[doc] + (torch.arange(total) - cu[doc])
    thd_rank = torch.empty(total, dtype=torch.int64)
    thd_slot = torch.empty(total, dtype=torch.int64)
    padded_to_real = torch.full((int(cu_padded[-1]),), -1, dtype=torch.int64)
    padded_to_real[padded_position] = torch.arange(total)
    for r in range(cp_size):
        index = thd_index(cu_padded, cp_size, r)
        real = padded_to_real[index]
        keep = real >= 0
        thd_rank[real[keep]] = r
        thd_slot[real[keep]] = torch.nonzero(keep).flatten()
        if r == cp_rank:
            thd_tokens = index.numel()

    send_slots, send_counts, recv_slots, recv_counts = [], [], [], []
    mine_sbhd = sbhd_rank == cp_rank
    mine_thd = thd_rank == cp_rank
    for other in range(cp_size):
        outgoing = torch.nonzero(mine_sbhd & (thd_rank == other)).flatten()
        outgoing = outgoing[torch.argsort(thd_slot[outgoing])]
        send_slots.append(sbhd_slot[outgoing])
        send_counts.append(outgoing.numel())
        incoming = torch.nonzero(mine_thd & (sbhd_rank == other)).flatten()
        incoming = incoming[torch.argsort(thd_slot[incoming])]
        recv_slots.append(thd_slot[incoming])
        recv_counts.append(incoming.numel())
    return ThdPlan(
        torch.cat(send_slots), send_counts, torch.cat(recv_slots), recv_counts, thd_tokens,
        cu.to(torch.int32), cu_padded.to(torch.int32), int(padded_lengths.max()),
        pad_between_seqs=not torch.equal(cu_padded[:-1], cu[:-1]),
    )


def _exchange(values: torch.Tensor, gather_slots, scatter_slots, send_counts, recv_counts,
              out_rows: int, group) -> torch.Tensor:
    """rows ``gather_slots`` of ``values`` go out; received rows land at ``scatter_slots`` of the
    result. The slots are already where ``values`` are (a device plan)."""
    outgoing = values.index_select(0, gather_slots).contiguous()
    staged = values.device.type != "cpu" and dist.get_backend(group) == "gloo"
    if staged:
        outgoing = outgoing.cpu()
    incoming = outgoing.new_empty((sum(recv_counts), *values.shape[1:]))
    dist.all_to_all_single(incoming, outgoing, output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    result = values.new_zeros((out_rows, *values.shape[1:]))
    result.index_copy_(0, scatter_slots, incoming.to(values.device) if staged else incoming)
    return result


class _ToThd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: ThdPlan, group):
        ctx.plan, ctx.group, ctx.rows = plan, group, x.shape[0]
        return _exchange(x, plan.send_slots, plan.recv_slots, plan.send_counts, plan.recv_counts,
                         plan.thd_tokens, group)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        return _exchange(grad.contiguous(), plan.recv_slots, plan.send_slots, plan.recv_counts,
                         plan.send_counts, ctx.rows, ctx.group), None, None


class _FromThd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: ThdPlan, rows: int, group):
        ctx.plan, ctx.group = plan, group
        return _exchange(x, plan.recv_slots, plan.send_slots, plan.recv_counts, plan.send_counts, rows, group)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        return _exchange(grad.contiguous(), plan.send_slots, plan.recv_slots, plan.send_counts,
                         plan.recv_counts, plan.thd_tokens, ctx.group), None, None, None


def to_thd(x: torch.Tensor, plan: ThdPlan, group) -> torch.Tensor:
    """[s_local, b, ...] in the load-balanced layout -> [thd_tokens, ...] (padding rows are zero)."""
    s, b = x.shape[:2]
    return _ToThd.apply(x.reshape(s * b, *x.shape[2:]), plan, group)


def from_thd(x: torch.Tensor, plan: ThdPlan, s_local: int, batch: int, group) -> torch.Tensor:
    """Inverse of :func:`to_thd`: [thd_tokens, ...] -> [s_local, b, ...]."""
    out = _FromThd.apply(x, plan, s_local * batch, group)
    return out.reshape(s_local, batch, *x.shape[1:])
