"""The planners through which :mod:`megalong.convert.dist_io` drives PyTorch Distributed Checkpoint.

DCP asks a save planner which items to write and then for each item's data, and a load
planner which stored regions to read and where to put them. These two answer from piece
descriptions and caller buffers instead of a state dict held in memory. Importing
``torch.distributed.checkpoint`` takes about a second, so ``dist_io`` imports this module
only when it writes or reads through DCP.
"""

from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megalong.convert.dist_pieces import DistCheckpointError, ObjectPiece, TensorPiece
from megalong.convert.prefetch import Prefetcher


class StreamingSavePlanner(DefaultSavePlanner):
    """Plans the write items from piece descriptions; produces each tensor when DCP asks
    for it (and the next one meanwhile, see :mod:`megalong.convert.prefetch`)."""

    def __init__(self, tensors: list[TensorPiece], objects: list[ObjectPiece], prefetch: Prefetcher,
                 on_written=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = {(p.key, torch.Size(p.offset)): p for p in tensors}
        self._order = {(p.key, torch.Size(p.offset)): i for i, p in enumerate(tensors)}
        self._objects = {p.key: p for p in objects}
        self._on_written = on_written
        # DCP resolves a file's tensors in plan order, one after another (thread_count=1).
        self.prefetch = prefetch
        self._written: torch.Tensor | None = None

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        for (key, offset), piece in self._tensors.items():
            items.append(WriteItem(
                index=MetadataIndex(key, offset),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offset, sizes=torch.Size(piece.shape)),
                    properties=TensorProperties(dtype=piece.dtype),
                    size=torch.Size(piece.global_shape),
                ),
            ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            # Megatron-Core stores a list of the objects of one key (see torch.py strategy).
            torch.save([self._objects[write_item.index.fqn].value], buffer)
            return buffer
        index = (write_item.index.fqn, torch.Size(write_item.index.offset))
        piece = self._tensors[index]
        self._release_written()
        tensor = self.prefetch.take(self._order[index])
        if tuple(tensor.shape) != tuple(piece.shape) or tensor.dtype != piece.dtype:
            raise DistCheckpointError(
                f"{piece.key} at {list(piece.offset)}: produced {list(tensor.shape)} {tensor.dtype}, "
                f"planned {list(piece.shape)} {piece.dtype}"
            )
        if self._on_written is not None:
            self._on_written(piece, tensor)
        self._written = tensor
        return tensor

    def _release_written(self) -> None:
        """Free the memory of the tensor DCP wrote last (it asks for the next one only
        after writing the previous). DCP keeps a reference to each tensor of a file until
        the file is complete (it needs them only for its safetensors format), which would
        keep the embedding and output tables alive for the whole write: 2.1 GB more for
        Llama-3-8B. Emptying the storage returns that memory; a later use would raise."""
        if self._written is not None and self._written.untyped_storage().resizable():
            self._written.untyped_storage().resize_(0)
        self._written = None


class RegionLoadPlanner(DefaultLoadPlanner):
    """Reads requested regions of stored tensors into caller-provided buffers."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for key, (offset, buffer) in self._regions.items():
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=buffer.shape)
            requests.extend(create_read_items_for_chunk_list(key, md, [chunk]))
        self.plan = LoadPlan(requests)
        return self.plan

    def resolve_tensor(self, read_item):
        _, buffer = self._regions[read_item.dest_index.fqn]
        view = buffer
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass
