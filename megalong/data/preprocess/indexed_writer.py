"""Write Megatron-Core's ``.bin/.idx`` indexed-dataset format incrementally and atomically.

The bytes are exactly what ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
writes (the tests compare the two byte for byte): one sequence per document for text corpora,
or documents of several sequences, with per-sequence modes when ``multimodal`` (packed
samples, megalong.data.packed), but:

* nothing grows in memory with the corpus: tokens go straight to the ``.bin`` and the
  per-sequence lengths (and modes), and the sequences per document, are spilled to side
  files, from which the ``.idx`` is streamed at the end (the builder keeps Python lists of
  every length and pointer);
* whole batches are written with numpy, with no per-document tensor conversion;
* the outputs appear atomically: everything is written under temporary names (carrying the
  process id, so an orphaned writer can never share a file with a new one) and renamed into
  place only when complete, ``.bin`` first and ``.idx`` last.

The format constants are restated here (instead of imported from Megatron-Core) so worker
processes do not import torch; ``tests/data/test_preprocess_writer.py`` pins them to
Megatron-Core's.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from pathlib import Path
from typing import Callable

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.int64): 5}
TOKEN_DTYPE = np.dtype(np.int32)  # holds Llama-3's 128,256 ids (uint16 stops at 65,535)
_IDX_PREAMBLE_BYTES = 9 + 8 + 1 + 8 + 8
_CHUNK = 1 << 20  # documents per streamed block when writing the index


# Temporary names carry the host and process: array tasks on different nodes share the
# output file system, and a name of its own per writer means no two can ever mix their bytes.
def tmp_tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"  # at call time: forked workers have their own pid


_TMP_NAME = re.compile(r"^(?P<target>.+)\.tmp\.(?P<host>.+)\.(?P<pid>\d+)$")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host can still write (a zombie, killed but not yet
    reaped by its parent, cannot). In doubt: True."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:  # "pid (name) state ..."
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_stale_temps(directory: str | Path,
                       is_ours: Callable[[str], bool]) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Delete the temporary files in ``directory`` that killed writers left behind: names
    ``<target>.tmp.<host>.<pid>`` (see tmp_tag) with ``is_ours(target)``, written on this host by
    a process that no longer exists. A writer removes its temporaries itself unless it is
    killed outright (SIGKILL, out of memory, a node failure), so such a file has no owner
    and no use: work is only ever resumed from finished files, never from a temporary.
    Left alone: temporaries of live processes (a concurrent task on this host; a reused pid
    errs on the safe side) and of other hosts, whose processes cannot be seen from here.
    Returns ([(removed path, bytes)], [kept paths])."""
    host = socket.gethostname()
    removed, kept = [], []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed, kept
    for name in names:
        match = _TMP_NAME.match(name)
        if match is None or not is_ours(match["target"]):
            continue
        path = Path(directory) / name
        if match["host"] != host or process_alive(int(match["pid"])):
            kept.append(path)
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # removed meanwhile by a concurrent task
            continue
        except OSError:  # not ours to remove after all (permissions): leave it
            kept.append(path)
            continue
        removed.append((path, size))
    return removed, kept


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def sidecar_path(prefix: str | Path) -> Path:
    """The dataset's JSON sidecar (settings and statistics), written last: its presence marks
    a complete dataset."""
    return Path(f"{prefix}.json")


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{tmp_tag()}")


class IndexedDatasetWriter:
    """Append documents (token arrays) and finalize into ``<prefix>.bin`` + ``<prefix>.idx``."""

    def __init__(self, prefix: str | Path, dtype=TOKEN_DTYPE, multimodal: bool = False):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.multimodal = multimodal
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"token dtype {self.dtype} is not one Megatron-Core reads back")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp(bin_path(self.prefix))
        self._lengths_tmp = _tmp(Path(f"{self.prefix}.lengths"))
        self._counts_tmp = _tmp(Path(f"{self.prefix}.counts"))
        self._modes_tmp = _tmp(Path(f"{self.prefix}.modes"))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = open(self._lengths_tmp, "wb")
        self._counts = open(self._counts_tmp, "wb")  # sequences per document, int32
        self._modes = open(self._modes_tmp, "wb") if multimodal else None
        self.num_documents = 0
        self.num_sequences = 0
        self.num_tokens = 0

    def _record(self, lengths: np.ndarray, counts: np.ndarray | None, modes) -> None:
        """Spill the index entries of sequences ``lengths``, grouped ``counts`` per document
        (None: one each), with ``modes`` (multimodal only)."""
        if counts is None:
            counts = np.ones(lengths.size, dtype=np.int32)
        counts = np.asarray(counts, dtype=np.int32)
        if int(counts.sum(dtype=np.int64)) != lengths.size or (counts.size and counts.min() < 1):
            raise ValueError(f"{lengths.size} sequences cannot be grouped as {counts.tolist()[:10]} per document")
        if self.multimodal:
            modes = np.zeros(lengths.size, dtype=np.int8) if modes is None else np.asarray(modes, dtype=np.int8)
            if modes.size != lengths.size:
                raise ValueError(f"{modes.size} modes for {lengths.size} sequences")
            self._modes.write(modes.tobytes())
        elif modes is not None:
            raise ValueError("sequence modes need a multimodal writer")
        self._lengths.write(lengths.tobytes())
        self._counts.write(counts.tobytes())
        self.num_sequences += lengths.size
        self.num_documents += counts.size

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document=None,
                      modes=None) -> None:
        """``tokens``: the sequences' tokens back to back; ``lengths``: tokens per sequence;
        ``sequences_per_document``: how many consecutive sequences make each document
        (default: one each); ``modes``: one per sequence (multimodal writers)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._record(lengths, sequences_per_document, modes)
        # A view, not tobytes(): a fresh multi-megabyte bytes object per call costs page faults
        # that took 4x the write itself (benchmarks/mds_convert.py).
        self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        self.num_tokens += tokens.size

    def append_from(self, handle, lengths: np.ndarray, sequences_per_document=None, modes=None) -> None:
        """Append sequences of ``lengths`` (grouped and moded as in add_documents) whose tokens
        (in this writer's dtype) are read from ``handle`` at its current position: merging
        shards without decoding them."""
        lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        count = int(lengths.sum(dtype=np.int64))
        self._record(lengths, sequences_per_document, modes)
        remaining = count * self.dtype.itemsize
        buffer = memoryview(bytearray(min(remaining, 1 << 22)))  # reused: no allocation per block
        while remaining > 0:
            size = handle.readinto(buffer[:min(remaining, len(buffer))])
            if not size:
                raise IOError(f"{handle.name}: ended {remaining} bytes before its index says")
            self._bin.write(buffer[:size])
            remaining -= size
        self.num_tokens += count

    def finalize(self, durable: bool = True) -> None:
        """Write the index and rename both files into place. ``durable`` also flushes them to
        disk first (survives a machine crash, not only a killed process); shards skip it."""
        if durable:
            self._bin.flush()
            os.fsync(self._bin.fileno())
        for handle in (self._bin, self._lengths, self._counts, self._modes):
            if handle is not None:
                handle.close()
        idx_tmp = _tmp(idx_path(self.prefix))
        itemsize = self.dtype.itemsize
        n = self.num_sequences

        def spilled(path: Path, dtype, count: int) -> np.ndarray:
            return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)

        with open(idx_tmp, "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", n))  # sequences
            out.write(struct.pack("<Q", self.num_documents + 1))  # document indices
            lengths = spilled(self._lengths_tmp, np.int32, n)
            for start in range(0, n, _CHUNK):
                out.write(np.ascontiguousarray(lengths[start : start + _CHUNK]).tobytes())
            pointer = 0
            for start in range(0, n, _CHUNK):
                block = lengths[start : start + _CHUNK].astype(np.int64) * itemsize
                ends = np.cumsum(block) + pointer
                out.write((ends - block).tobytes())
                pointer = int(ends[-1])
            # Document index: the first sequence of every document, then the sequence count.
            counts = spilled(self._counts_tmp, np.int32, self.num_documents)
            out.write(np.zeros(1, np.int64).tobytes())
            first = 0
            for start in range(0, self.num_documents, _CHUNK):
                ends = np.cumsum(counts[start : start + _CHUNK], dtype=np.int64) + first
                out.write(ends.tobytes())
                first = int(ends[-1])
            if self.multimodal:
                modes = spilled(self._modes_tmp, np.int8, n)
                for start in range(0, n, _CHUNK):
                    out.write(np.ascontiguousarray(modes[start : start + _CHUNK]).tobytes())
                del modes
            del lengths, counts
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        for spill in (self._lengths_tmp, self._counts_tmp, self._modes_tmp):
            if spill.exists():
                os.unlink(spill)

    def abort(self) -> None:
        for handle in (self._bin, self._lengths, self._counts, self._modes):
            if handle is not None:
                handle.close()
        for path in (self._bin_tmp, self._lengths_tmp, self._counts_tmp, self._modes_tmp, _tmp(idx_path(self.prefix))):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _preamble(prefix: str | Path) -> tuple[np.dtype, int, int]:
    path = idx_path(prefix)
    with open(path, "rb") as handle:
        preamble = handle.read(_IDX_PREAMBLE_BYTES)
    if len(preamble) < _IDX_PREAMBLE_BYTES or preamble[:9] != INDEX_HEADER:
        raise ValueError(f"{path}: not a Megatron indexed-dataset index")
    code = preamble[17]
    dtype = next((dt for dt, c in DTYPE_CODES.items() if c == code), None)
    if dtype is None:
        raise ValueError(f"{path}: token dtype code {code} is not supported")
    sequences, documents = struct.unpack("<QQ", preamble[18:34])
    return dtype, sequences, documents


def read_index(prefix: str | Path) -> tuple[np.dtype, np.ndarray]:
    """(token dtype, per-sequence lengths) of an indexed dataset, lengths memory-mapped."""
    dtype, count, _ = _preamble(prefix)
    path = idx_path(prefix)
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=_IDX_PREAMBLE_BYTES, shape=(count,)) if count else np.zeros(0, np.int32)
    return dtype, lengths


def read_grouping(prefix: str | Path, multimodal: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(sequences per document, per-sequence modes or None) of an indexed dataset."""
    _, sequences, documents = _preamble(prefix)
    path = idx_path(prefix)
    offset = _IDX_PREAMBLE_BYTES + sequences * (4 + 8)
    document_indices = np.fromfile(path, dtype=np.int64, count=documents, offset=offset)
    modes = (np.fromfile(path, dtype=np.int8, count=sequences, offset=offset + documents * 8)
             if multimodal else None)
    return np.diff(document_indices).astype(np.int32), modes
