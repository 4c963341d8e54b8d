"""The two communication patterns of context parallelism, on any backend.

NCCL takes GPU tensors directly. Gloo takes CPU tensors only, so with gloo and GPU
tensors (several CP ranks sharing one GPU, as ``tools/gpu_check.py`` does) the tensors
are staged through host memory. On CPU nothing is copied.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _needs_staging(tensor: torch.Tensor, group) -> bool:
    return tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"


class RingExchange:
    """Shifted point-to-point exchanges within ``group``, asynchronous.

    ``start(tensor, shift)`` sends to rank ``r + shift`` and receives from ``r - shift``
    (``shift=1``: the classic ring). ``tag`` keeps two exchanges in flight at once
    between the same ranks apart.
    """

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def start(self, tensor: torch.Tensor, shift: int = 1, tag: int = 0):
        """Begin the exchange; returns a handle for :meth:`wait`."""
        staged = _needs_staging(tensor, self.group)
        outgoing = tensor.cpu() if staged else tensor
        received = torch.empty_like(outgoing)
        ops = [
            dist.P2POp(dist.isend, outgoing, self.ranks[(self.rank + shift) % self.size], self.group, tag),
            dist.P2POp(dist.irecv, received, self.ranks[(self.rank - shift) % self.size], self.group, tag),
        ]
        return received, dist.batch_isend_irecv(ops), tensor.device, outgoing

    @staticmethod
    def wait(handle) -> torch.Tensor:
        """Finish the exchange; returns the tensor received from the previous rank."""
        received, requests, device, _outgoing = handle  # keep the outgoing buffer alive until sent
        for request in requests:
            request.wait()
        return received.to(device, non_blocking=False)


def all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 (split evenly), staged through the host for gloo + GPU."""
    if _needs_staging(send, group):
        host = send.cpu()
        received = torch.empty_like(host)
        dist.all_to_all_single(received, host, group=group)
        return received.to(send.device)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received
