"""Checksums of a checkpoint's files: recorded when it is published, verified before it is loaded.

A distributed checkpoint that lost bytes (a disk that filled while it was copied, a file
cut short by a quota, a bad block) does not always fail to load: torch's reader reports a
truncated file as a bare ``EOFError`` without naming it, and changed bytes inside a tensor
load silently as wrong weights. So every file's size and CRC-32 go into
``checksums.json`` (:data:`megalong.checkpoint.layout.CHECKSUMS_FILE`) before the
checkpoint is renamed into place, and a resume compares them first.

CRC-32 (zlib, in the standard library) is the fastest checksum at hand here (2-3 GB/s on
one core of these machines, about twice SHA-256 or BLAKE2) and catches every accidental
change of up to 32 consecutive bits; it is no defence against deliberate tampering, which
is not the threat. ``benchmarks/checkpoint_checksums.py`` measures it against the write.
The files are split among the ranks (:func:`owner`) so that each reads about the share it
wrote, which is still in its page cache at save time.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Iterable, Optional

from megalong.checkpoint.layout import CHECKSUMS_FILE

_BLOCK = 8 << 20
# Megatron-Core's torch_dist writer names the files of global rank r "__r_<n>.distcp".
_WRITER_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")


def checkpoint_files(directory: str | Path) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted), the checksum file aside."""
    directory = Path(directory)
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = (Path(root) / name).relative_to(directory).as_posix()
            if relative != CHECKSUMS_FILE:
                found.append(relative)
    return sorted(found)


def owner(relative: str, world_size: int) -> int:
    """The rank that checksums ``relative``: the rank that wrote it when its name says (at
    another world size, that rank modulo the size), else rank 0 (the small files)."""
    match = _WRITER_RANK.match(Path(relative).name)
    return int(match.group(1)) % world_size if match else 0


def file_record(path: str | Path) -> dict:
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def records(directory: str | Path, files: Iterable[str]) -> dict[str, dict]:
    directory = Path(directory)
    return {relative: file_record(directory / relative) for relative in files}


def write(directory: str | Path, all_records: dict[str, dict]) -> None:
    path = Path(directory) / CHECKSUMS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": dict(sorted(all_records.items()))}, indent=0),
                   encoding="utf-8")
    os.replace(tmp, path)


def read(directory: str | Path) -> Optional[dict[str, dict]]:
    """The recorded checksums (relative path -> record); None when the checkpoint has none
    (written by an earlier megalong, or a converted weights directory)."""
    path = Path(directory) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from None


def problems(directory: str | Path, recorded: dict[str, dict], files: Iterable[str]) -> list[str]:
    """What is wrong with ``files`` of ``directory`` against their recorded checksums, one
    sentence per file, naming it (empty when all match)."""
    directory = Path(directory)
    found = []
    for relative in files:
        expected = recorded[relative]
        path = directory / relative
        try:
            size = path.stat().st_size
            if size != expected["bytes"]:
                how = "truncated" if size < expected["bytes"] else "longer than written"
                found.append(f"{path} has {size:,} bytes, {expected['bytes']:,} were written ({how})")
                continue
            actual = file_record(path)["crc32"]
        except OSError as err:
            found.append(f"{path} cannot be read ({err.strerror or err})")
            continue
        if actual != expected["crc32"]:
            found.append(f"{path} does not match the checksum recorded when it was written "
                         f"(crc32 {actual}, recorded {expected['crc32']}): its content changed")
    return found
