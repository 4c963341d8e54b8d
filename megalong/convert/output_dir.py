"""Output directories that appear complete or not at all."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("megalong.convert")


@contextlib.contextmanager
def staged_output(final: str | Path):
    """Yield a temporary sibling of ``final``; rename it to ``final`` only on success.

    An existing ``final`` is refused before anything is written, and on any error the
    temporary directory is removed, so a failed or interrupted run leaves nothing behind
    (a killed process leaves ``<final>.tmp-<pid>``, which a rerun ignores).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"output {final} already exists; choose a new path or remove it first")
    if not final.parent.is_dir():
        raise FileNotFoundError(f"parent directory of the output {final.parent} does not exist")
    stale = sorted(p.name for p in final.parent.glob(f"{final.name}.tmp-*"))
    if stale:
        # Left by a killed earlier run (or one still running elsewhere): never ours to delete.
        log.warning("ignoring leftover temporary output(s) %s in %s; remove them once no conversion "
                    "is running", ", ".join(stale), final.parent)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            raise FileExistsError(f"output {final} appeared while converting; leaving it alone")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
