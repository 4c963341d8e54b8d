"""List input directories and open input files so that nothing is lost silently and nothing hangs.

* ``walk_files`` hands every directory it cannot list to ``on_error`` (``os.walk`` without
  ``onerror`` drops such a directory and everything below it without a word);
* ``open_regular`` opens only regular files: opening a named pipe for reading waits for a
  writer that may never come, and a device can be endless.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def walk_files(directory: Path, on_error: Callable[[OSError], None],
               prune: Callable[[Path], bool] | None = None) -> list[Path]:
    """Every file under ``directory`` (symlinked directories are not entered), sorted by path.
    ``prune(subdirectory)`` returning True leaves a sub-directory out."""
    files = []
    for root, dirs, names in os.walk(directory, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if prune is None or not prune(Path(root) / d))
        files.extend(Path(root) / n for n in names)
    return sorted(files, key=str)


def not_regular_error(path: str | Path, mode: int) -> OSError:
    return OSError(errno.EINVAL, f"not a regular file but a {file_kind(mode)}", str(path))


def open_regular(path: str | Path, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file, else raise OSError. Checked
    before opening (opening a device can have effects) and again on the open descriptor (the
    name could have been replaced in between); O_NONBLOCK keeps even that open from waiting."""
    mode = (os.stat if follow_symlinks else os.lstat)(path).st_mode
    if not stat.S_ISREG(mode):
        raise not_regular_error(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular_error(path, mode)
        return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file
    except BaseException:
        os.close(fd)
        raise
