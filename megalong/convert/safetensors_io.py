"""Read and write safetensors files one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header that
names every tensor with its dtype, shape and byte range, then the raw bytes. The
``safetensors`` library maps whole files into memory, and touched mapped pages count
towards a process's resident memory; to keep conversion memory at "one tensor", this
module reads each tensor with a plain ``readinto`` and writes shards by planning the
header first and then streaming tensors into place in order.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that is not what it claims to be."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Parse and check the header of one safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {header_len} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: header is not valid JSON ({err})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as err:
            raise SafetensorsError(f"{path}: tensor {name!r} has an unsupported or missing field {err}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} claims bytes [{begin}, {end}) for shape {list(shape)} "
                f"{info['dtype']} ({expected} bytes) in a file with {size - data_start} data bytes "
                "(truncated or corrupt file?)"
            )
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    return entries


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (no mapping of the file)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    read_rows(path, entry, 0, out)
    return out


def read_rows(path: str | Path, entry: TensorEntry, first_row: int, out: torch.Tensor) -> None:
    """Read rows ``[first_row, first_row + len(out))`` of a tensor (elements of a 1-D one)
    straight into ``out``, a contiguous tensor or view (e.g. a slice of a fused tensor)."""
    row_shape = entry.shape[1:]
    if tuple(out.shape[1:]) != row_shape or out.dtype != entry.dtype or not out.is_contiguous():
        raise ValueError(f"{path}: rows of {entry.name!r} {list(entry.shape)} {entry.dtype} cannot be read "
                         f"into a {list(out.shape)} {out.dtype} tensor")
    rows = out.shape[0] if out.dim() else 1
    if entry.shape and first_row + rows > entry.shape[0]:
        raise ValueError(f"{path}: rows [{first_row}, {first_row + rows}) are outside {entry.name!r} {list(entry.shape)}")
    row_bytes = math.prod(row_shape) * entry.dtype.itemsize
    nbytes = rows * row_bytes
    if nbytes == 0:
        return
    # The bytes of ``out`` as a writable buffer. Not through numpy: a numpy view pins the
    # storage's size for good, and the checkpoint writer frees written tensors by resizing.
    view = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(entry.begin + first_row * row_bytes)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise SafetensorsError(f"{path}: file ended inside tensor {entry.name!r}")
            done += n


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """Writes one safetensors file whose tensors are known in advance, in the planned order.

    ``write(name, tensor)`` must be called for every planned tensor, in order; ``close``
    checks that the file is complete.
    """

    def __init__(self, path: str | Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._planned = list(tensors)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in self._planned:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # Pad with spaces so the data starts 8-byte aligned, as the safetensors library does.
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._planned):
            raise RuntimeError(f"{self.path}: unplanned tensor {name!r}")
        planned = self._planned[self._next]
        if name != planned.name or tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"{self.path}: expected tensor {planned.name!r} {list(planned.shape)} {planned.dtype}, "
                f"got {name!r} {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        missing = [t.name for t in self._planned[self._next:]]
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if missing:
            raise RuntimeError(f"{self.path}: closed before writing {', '.join(missing)}")
