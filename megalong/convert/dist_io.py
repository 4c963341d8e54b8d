"""Write and read Megatron-Core distributed checkpoints without holding the model.

Megatron-Core's ``dist_checkpointing`` saves a model's sharded state dict with the
``torch_dist`` backend: a PyTorch Distributed Checkpoint (DCP) directory whose keys are
the ShardedTensor keys (per-layer tensors stacked along a leading layer axis) plus
``metadata.json`` and ``common.pt``. Saving through Megatron-Core needs every tensor in
memory at once; for conversion that is the whole model. This module writes the same
directory through DCP's own planner interface (:mod:`megalong.convert.dcp_planners`),
producing each tensor only when DCP is about to write it, and reads any rectangular
region of a stored tensor (e.g. one layer of a stacked tensor) without reading the
rest. The result loads with
``megalong.checkpoint.weights.load_weights`` at any TP/PP, and reading accepts what
Megatron-Core saved at any TP/PP.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Callable

import torch

from megalong.convert.dist_pieces import DistCheckpointError, ObjectPiece, TensorPiece
from megalong.convert.prefetch import Prefetcher


# What Megatron-Core writes for its torch_dist backend (dist_checkpointing/core.py).
MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}


def sharded_object_key(key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """Megatron-Core's ShardedObject.unique_key."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


def _unwrapped(call):
    """Run a DCP call; re-raise the first underlying error instead of DCP's CheckpointException
    (a BaseException that would slip past ordinary error handling)."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            # Single-process use is the point here, not a mistake.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return call()
    except CheckpointException as wrapped:
        for failure in wrapped.failures.values():
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, Exception):
                raise error from None
        raise RuntimeError(str(wrapped)) from None


def write_checkpoint(
    directory: str | Path,
    tensors: list[TensorPiece],
    objects: list[ObjectPiece] = (),
    on_written: Callable[[TensorPiece, torch.Tensor], None] | None = None,
) -> int:
    """Write a torch_dist checkpoint. Pieces are produced in list order, each while the one
    before it is written (see :class:`Prefetcher` for the memory this takes). Returns how
    many pieces were produced that way, ahead of their turn."""
    tensors = list(tensors)
    # Started first, so the first piece is read while torch's checkpoint modules import (~1 s).
    with Prefetcher([p.produce for p in tensors], [p.nbytes for p in tensors]) as prefetch:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        from megalong.convert.dcp_planners import StreamingSavePlanner

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # One writing thread, one file: DCP asks for the tensors one after another, in plan order.
        writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
        planner = StreamingSavePlanner(tensors, list(objects), prefetch, on_written)
        # torch.save's CRC32 of every record ran at ~0.7 GB/s, the slowest stage of a conversion,
        # and nothing reads it: torch.load (hence DCP and Megatron-Core) does not verify it.
        # torch.serialization.set_crc32_options switches it off; the process-wide setting is
        # restored afterwards.
        crc_before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            _unwrapped(lambda: dcp.save({}, storage_writer=writer, planner=planner, no_dist=True))
        finally:
            torch.serialization.set_crc32_options(crc_before)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(MCORE_METADATA), encoding="utf-8")
    return prefetch.hits


class CheckpointReader:
    """Random access to the tensors of a torch_dist checkpoint directory."""

    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        meta_json = self.directory / "metadata.json"
        if not meta_json.is_file():
            raise DistCheckpointError(f"{self.directory} is not a Megatron-Core distributed checkpoint: {meta_json} is missing")
        backend = json.loads(meta_json.read_text(encoding="utf-8")).get("sharded_backend")
        if backend != "torch_dist":
            raise DistCheckpointError(f"{meta_json}: sharded_backend {backend!r} is not supported (need torch_dist)")
        self._reader_cls = FileSystemReader
        try:
            metadata = FileSystemReader(str(self.directory)).read_metadata()
        except (OSError, EOFError, RuntimeError) as err:
            raise DistCheckpointError(f"{self.directory}/.metadata cannot be read: {err}") from None
        self.tensors = {
            key: md for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }
        self._storage = metadata.storage_data  # chunk -> (file, byte range) of its torch.save record
        files = {info.relative_path for info in metadata.storage_data.values()}
        missing = sorted(f for f in files if not (self.directory / f).is_file())
        if missing:
            raise DistCheckpointError(f"{self.directory}: checkpoint files missing: {', '.join(missing)}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def _md(self, key: str):
        if key not in self.tensors:
            raise DistCheckpointError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        return self.tensors[key]

    def read(self, requests: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Read regions: {key: (offset, shape)} -> {key: tensor}, in the stored dtype."""
        out, regions = {}, {}
        for key, (offset, shape) in requests.items():
            size = self.shape(key)
            offset, shape = tuple(offset), tuple(shape)
            if len(offset) != len(size) or any(o + s > d for o, s, d in zip(offset, shape, size)):
                raise DistCheckpointError(f"{key}: region {list(offset)}+{list(shape)} is outside {list(size)}")
            whole = self._read_stored_chunk(key, offset, shape)
            if whole is not None:
                out[key] = whole
            else:
                regions[key] = (offset, torch.empty(shape, dtype=self.dtype(key)))
        if regions:
            # Regions that span or cut stored chunks (a checkpoint saved at another TP/PP):
            # DCP assembles them from the chunks.
            import torch.distributed.checkpoint as dcp

            from megalong.convert.dcp_planners import RegionLoadPlanner

            reader = self._reader_cls(str(self.directory))
            _unwrapped(lambda: dcp.load({}, storage_reader=reader, planner=RegionLoadPlanner(regions), no_dist=True))
            out.update({key: buffer for key, (_, buffer) in regions.items()})
        return out

    def _read_stored_chunk(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """A region that is exactly one stored chunk, loaded from its record as DCP would load
        it, but without DCP's second copy into a caller's buffer (which doubled the time and
        the memory of reading, e.g. two embedding tables at once); None for other regions."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if not any(tuple(c.offsets) == offset and tuple(c.sizes) == shape for c in self._md(key).chunks):
            return None
        info = self._storage.get(MetadataIndex(key, offset))
        if info is None or getattr(info, "transform_descriptors", None):
            return None  # stored through a DCP extension (e.g. compressed): DCP's own path
        path = self.directory / info.relative_path
        with open(path, "rb", buffering=0) as f:
            try:
                tensor = torch.load(_FileWindow(f, info.offset, info.length), map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
                raise DistCheckpointError(f"{path}: the record of {key} at {list(offset)} cannot be read: {err}") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != self.dtype(key):
            raise DistCheckpointError(f"{path}: the record of {key} at {list(offset)} is not a {list(shape)} "
                                      f"{self.dtype(key)} tensor (corrupt checkpoint?)")
        return tensor


class _FileWindow(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open file, as a file of their own."""

    def __init__(self, file, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._length, self._pos = file.fileno(), start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        done = 0
        while done < count:
            n = os.preadv(self._fd, [view[done:count]], self._start + self._pos + done)
            if n == 0:
                raise EOFError("file ended inside a checkpoint record")
            done += n
        self._pos += done
        return done
