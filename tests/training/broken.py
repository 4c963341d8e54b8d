"""Broken checkpoints and failing saves for the training tests (module-level so spawned
processes can import them)."""

from __future__ import annotations

import shutil
from pathlib import Path

# What the "full disk" lets a process write: test-tiny's checkpoint model files are ~460 KB
# each, its other files (configs, RNG states, metadata, logs, metrics) < 40 KB.
FILE_SIZE_LIMIT = 200_000


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def damage(path: Path, how: str) -> None:
    """``how``: "truncate" (cut the file in half, as a full disk or a quota leaves it) or
    "corrupt" (change bytes in the middle, size unchanged, as a bad block leaves it)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))


def copy_checkpoint(source_save_dir: str, dest_save_dir: str, name: str, damaged: str = "", how: str = "",
                    without_checksums: bool = False) -> None:
    """Copy checkpoint ``name`` of one save dir into a fresh one, point its ``latest`` at it,
    damage its file ``damaged`` (relative path) if given, and delete its checksums.json if
    asked (as an earlier megalong wrote checkpoints) (rank 0; a barrier after)."""
    import torch.distributed as dist

    if _rank() == 0:
        dest = Path(dest_save_dir)
        shutil.copytree(Path(source_save_dir) / name, dest / name)
        (dest / "latest").write_text(name + "\n")
        if damaged:
            damage(dest / name / damaged, how)
        if without_checksums:
            (dest / name / "checksums.json").unlink()
    if dist.is_initialized():
        dist.barrier()


def train_catching(run_dict: dict, file_size_limit: int = 0, limited_rank: int = 0):
    """Entry point for run_processes: train, returning the exit code, or ``"<error type>:
    <message>"`` if it raised. With ``file_size_limit``, rank ``limited_rank`` may not write
    files larger than that many bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write past it fails
    with EFBIG as on a full disk) while it trains; the limit is lifted afterwards."""
    import resource

    from tests.training.helpers import limit_file_size, train_from_dict

    limited = file_size_limit and _rank() == limited_rank
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limited:
        limit_file_size(file_size_limit)
    try:
        return train_from_dict(run_dict)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        if limited:
            resource.setrlimit(resource.RLIMIT_FSIZE, previous)
