"""Read mosaicml-streaming (MDS) datasets: the format ProLong released its data in.

Why our own reader and not ``streaming`` itself: importing ``streaming`` (any version)
imports ``torchvision``, and ``pip install mosaicml-streaming`` (0.13.0) pins numpy < 2.2 and
transformers < 5 and pulls a CUDA build of torch (measured: it replaced this project's CPU
torch 2.13.0 with torch 2.14.1+cu130, 4.4 GB); PyPI's torchvision wheels do not load on a CPU
torch build at all ("operator torchvision::nms does not exist"). Reading MDS needs none of
that: the format is a JSON index plus shard files of length-prefixed samples, documented in
streaming's ``streaming/base/format/mds/{writer,reader,encodings}.py``. This module reads
exactly that layout, with numpy, and nothing else; the tests check it against shards written
by streaming's own ``MDSWriter`` (tests/data/fixtures/mds/make_fixtures.py).

The layout, as ``MDSWriter.encode_joint_shard`` / ``MDSReader.get_sample_data`` write and read it:

* ``index.json``: ``{"version": 2, "shards": [...]}``; each shard entry names its file
  (``raw_data.basename``, or ``zip_data.basename`` when compressed), its sample count and
  its columns (``column_names``, ``column_encodings``, ``column_sizes``: bytes of a fixed-size
  column, null for a variable one). A basename may contain sub-directories (datatools'
  merged indexes point into ``job*/proc*`` folders).
* a shard file: ``uint32 n``, ``uint32 offsets[n + 1]`` (absolute byte positions of the
  samples), the writer's JSON config, then the samples back to back;
* a sample: one ``uint32`` size per variable-size column, in column order, then each
  column's bytes in column order;
* ``ndarray[:dtype[:shape]]``: without a dtype in the encoding the value starts with a dtype
  code byte; without a shape, with a byte ``ndim << 2 | shape_dtype`` and the shape.

Unsafe encodings (``pkl``: unpickling runs code) and image encodings are refused by name.
"""

from __future__ import annotations

import bz2
import gzip
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

INDEX_NAME = "index.json"

# streaming/base/format/mds/encodings.py: NDArray._int2value_dtype and _int2shape_dtype.
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_SCALARS = {name: np.dtype(name) for name in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                                              "int64", "float16", "float32", "float64")}


class MdsError(ValueError):
    """An MDS index, shard or sample that cannot be read; the message says where and why."""


def _ndarray_decoder(config: str) -> Callable[[memoryview], np.ndarray]:
    parts = config.split(":") if config else []
    if len(parts) > 2:
        raise MdsError(f"ndarray encoding 'ndarray:{config}' has too many fields")
    fixed_dtype = np.dtype(parts[0]) if parts and parts[0] else None
    fixed_shape = tuple(int(d) for d in parts[1].split(",")) if len(parts) == 2 else None

    def decode(data: memoryview) -> np.ndarray:
        index = 0
        dtype = fixed_dtype
        if dtype is None:
            code = data[0]
            if code not in _VALUE_DTYPES:
                raise MdsError(f"unknown ndarray dtype code {code}")
            dtype, index = np.dtype(_VALUE_DTYPES[code]), 1
        shape = fixed_shape
        if shape is None:
            if len(data) <= index:
                raise MdsError("ndarray value ends before its shape")
            byte = data[index]
            ndim, shape_dtype = byte >> 2, _SHAPE_DTYPES[byte & 3]
            index += 1
            end = index + ndim * np.dtype(shape_dtype).itemsize
            if len(data) < end:
                raise MdsError("ndarray value ends inside its shape")
            shape = tuple(int(d) for d in np.frombuffer(data[index:end], shape_dtype))
            index = end
        count = int(np.prod(shape)) if shape else 1
        if len(data) - index != count * dtype.itemsize:
            raise MdsError(f"ndarray of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                           f"the sample holds {len(data) - index}")
        return np.frombuffer(data[index:], dtype).reshape(shape)

    return decode


def _decoder(encoding: str) -> Callable[[memoryview], Any]:
    name, _, config = encoding.partition(":")
    if name == "ndarray":
        return _ndarray_decoder(config)
    if name in _SCALARS:
        dtype = _SCALARS[name]
        return lambda data: np.frombuffer(data, dtype, count=1)[0]
    if name == "int":
        return lambda data: int(np.frombuffer(data, np.int64, count=1)[0])
    if name == "str":
        return lambda data: bytes(data).decode("utf-8")
    if name == "str_int":
        return lambda data: int(bytes(data).decode("utf-8"))
    if name == "json":
        return lambda data: json.loads(bytes(data).decode("utf-8"))
    if name == "bytes":
        return bytes
    if name == "pkl":
        raise MdsError("encoding 'pkl' is pickle, which runs code when read: refused")
    raise MdsError(f"encoding {encoding!r} is not one megalong reads (token data needs ndarray, str and integer columns)")


@dataclass
class MdsShard:
    """One shard of an MDS dataset, as its ``index.json`` entry describes it."""

    dataset: Path  # the directory holding index.json
    number: int  # position in index.json
    info: dict

    @property
    def column_names(self) -> list[str]:
        return list(self.info.get("column_names", []))

    @property
    def raw_path(self) -> Path:
        return self.dataset / self.info["raw_data"]["basename"]

    @property
    def zip_path(self) -> Path | None:
        zip_data = self.info.get("zip_data")
        return self.dataset / zip_data["basename"] if zip_data else None

    @property
    def path(self) -> Path:
        """The file that will be read: the plain shard if present, else the compressed one."""
        zipped = self.zip_path
        if zipped is not None and not os.path.lexists(self.raw_path):
            return zipped
        return self.raw_path

    @property
    def samples(self) -> int:
        return int(self.info.get("samples", 0))

    @property
    def size_on_disk(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


def read_index(dataset: str | Path) -> list[MdsShard]:
    """The shards listed in ``dataset/index.json``; MdsError names the file and the problem."""
    dataset = Path(dataset)
    index_path = dataset / INDEX_NAME
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        below = sorted(str(p.parent.relative_to(dataset)) for p in dataset.glob(f"*/**/{INDEX_NAME}"))[:3]
        hint = f"; sub-directories with one: {', '.join(below)} (give each as its own --input)" if below else ""
        raise MdsError(f"{index_path}: missing (an MDS dataset directory starts with its index.json{hint})") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MdsError(f"{index_path}: not a readable JSON index ({err})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise MdsError(f"{index_path}: no 'shards' list")
    if index.get("version") != 2:
        raise MdsError(f"{index_path}: version {index.get('version')!r}; MDS index version 2 is read")
    shards = []
    for number, info in enumerate(index["shards"]):
        where = f"{index_path} shard {number}"
        if not isinstance(info, dict) or info.get("format") != "mds":
            raise MdsError(f"{where}: format {info.get('format') if isinstance(info, dict) else info!r}, not mds")
        if info.get("version") != 2:
            raise MdsError(f"{where}: shard version {info.get('version')!r}; version 2 is read")
        try:
            names, encodings, sizes = info["column_names"], info["column_encodings"], info["column_sizes"]
            info["raw_data"]["basename"]
        except (KeyError, TypeError):
            raise MdsError(f"{where}: lacks column_names/column_encodings/column_sizes or raw_data") from None
        if not len(names) == len(encodings) == len(sizes):
            raise MdsError(f"{where}: {len(names)} column names, {len(encodings)} encodings, {len(sizes)} sizes")
        shards.append(MdsShard(dataset, number, info))
    return shards


def _decompress(algorithm: str, data: bytes) -> bytes:
    name = algorithm.split(":")[0]
    if name == "zstd":
        import zstandard

        # MDS writes one zstd frame whose size is in its header (zstd.compress); allow any size.
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
    if name == "gz":
        return gzip.decompress(data)
    if name == "bz2":
        return bz2.decompress(data)
    if name == "br":
        try:
            import brotli
        except ImportError:
            raise MdsError("compressed with brotli: pip install Brotli to read it") from None
        return brotli.decompress(data)
    if name == "snappy":
        try:
            import snappy
        except ImportError:
            raise MdsError("compressed with snappy: pip install python-snappy to read it") from None
        return snappy.decompress(data)
    raise MdsError(f"unknown compression {algorithm!r}")


class ShardReader:
    """The samples of one shard. Opening checks the header; a file cut short (a download that
    stopped) keeps every sample that lies wholly inside it: ``readable`` counts them."""

    def __init__(self, shard: MdsShard, columns: list[str] | None = None):
        self.shard = shard
        path = shard.path
        self.where = str(path)
        try:
            with open(path, "rb") as handle:
                if path == shard.raw_path:
                    # Memory-mapped: samples are views of the file (reading a 64 MiB shard into a
                    # fresh bytes object cost more than converting it). The map closes when the
                    # last view of it goes.
                    size = os.fstat(handle.fileno()).st_size
                    self.data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
                else:  # a compressed shard is decompressed whole, in memory
                    self.data = _decompress(shard.info.get("compression") or "", handle.read())
        except MdsError as err:
            raise MdsError(f"{path}: {err}") from None
        except OSError as err:
            raise MdsError(f"{path}: {err.strerror or err}") from None
        except Exception as err:  # a corrupt compressed stream (zstandard.ZstdError, zlib.error, OSError, ...)
            raise MdsError(f"{path}: cannot be decompressed ({type(err).__name__}: {err})") from None
        view = memoryview(self.data)
        size = len(view)
        if size < 4:
            raise MdsError(f"{path}: {size} bytes, too short for an MDS shard header")
        count = int(np.frombuffer(view[:4], np.uint32)[0])
        if count != shard.samples:
            raise MdsError(f"{path}: holds {count} samples, its index.json entry says {shard.samples}")
        header_end = 4 + 4 * (count + 1)
        if size < header_end:
            raise MdsError(f"{path}: {size} bytes, cut inside the sample table")
        self.offsets = np.frombuffer(view[4:header_end], np.uint32).astype(np.int64)
        if self.offsets[0] < header_end or np.any(np.diff(self.offsets) < 0):
            raise MdsError(f"{path}: the sample table is corrupt (offsets out of order)")
        self.view = view
        self.count = count
        # Samples wholly inside the file; a truncated file loses the rest.
        self.readable = int(np.searchsorted(self.offsets[1:], size, side="right"))
        names = shard.column_names
        self.columns = names
        self.sizes = [int(s) if s else None for s in shard.info["column_sizes"]]
        wanted = set(names if columns is None else columns)
        try:
            self.decoders = [(_decoder(enc) if name in wanted else None)
                             for name, enc in zip(names, shard.info["column_encodings"])]
        except MdsError as err:
            raise MdsError(f"{path}: {err}") from None
        self.variable = sum(size is None for size in self.sizes)

    def sample(self, index: int) -> dict:
        """The decoded columns of sample ``index`` (the columns asked for when opened)."""
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        data = self.view[begin:end]
        sizes = list(self.sizes)
        position = 4 * self.variable
        if len(data) < position:
            raise MdsError(f"sample {index} is {len(data)} bytes, shorter than its column sizes")
        variable = iter(np.frombuffer(data[:position], np.uint32).tolist())
        sizes = [size if size is not None else next(variable) for size in sizes]
        if position + sum(sizes) != len(data):
            raise MdsError(f"sample {index}: its columns take {position + sum(sizes)} bytes, the sample has {len(data)}")
        sample = {}
        for name, size, decode in zip(self.columns, sizes, self.decoders):
            if decode is not None:
                try:
                    sample[name] = decode(data[position:position + size])
                except MdsError as err:
                    raise MdsError(f"sample {index}, column {name!r}: {err}") from None
                except (ValueError, UnicodeDecodeError, IndexError) as err:
                    raise MdsError(f"sample {index}, column {name!r}: {err}") from None
            position += size
        return sample

    def sample_bytes(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

def iter_samples(dataset: str | Path, columns: list[str] | None = None) -> Iterator[dict]:
    """Every sample of an MDS dataset, in index order (raises MdsError at the first problem)."""
    for shard in read_index(dataset):
        reader = ShardReader(shard, columns)
        if reader.readable < reader.count:
            raise MdsError(f"{reader.where}: cut short after sample {reader.readable} of {reader.count}")
        for index in range(reader.count):
            yield reader.sample(index)
