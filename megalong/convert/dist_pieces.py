"""What :mod:`megalong.convert.dist_io` writes and reads, piece by piece: the types it shares
with the DCP planners of :mod:`megalong.convert.dcp_planners` (a module of their own, so
that neither of the two imports the other)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


class DistCheckpointError(ValueError):
    """A distributed checkpoint that is missing, unreadable or lacks a tensor."""


@dataclass
class TensorPiece:
    """One chunk of a global tensor, produced on demand. ``produce`` returns a tensor of its
    own (not a view of memory the caller keeps): the writer frees it once written."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ObjectPiece:
    """A ShardedObject (e.g. a layer's ``_extra_state``); stored as Megatron-Core stores it."""

    key: str
    value: object
