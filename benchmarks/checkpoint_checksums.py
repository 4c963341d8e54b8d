"""What recording and verifying checkpoint checksums costs, against writing and reading the checkpoint.

megalong records every checkpoint file's size and CRC-32 before publishing it and compares
them before loading it (megalong.checkpoint.checksums). This script writes tensors of the
given total size as a torch distributed checkpoint (the writer Megatron-Core's torch_dist
format uses), then times, in one process:

* baseline: the write (``torch.distributed.checkpoint.save``) and the read (``load``);
* recording the checksums of the files just written (at publish time they are in the page
  cache of the rank that wrote them, as here);
* verifying them (before a resume; warm cache here, so this is the CPU cost: from a cold
  network file system add one more read of the files).

and prints the ratios. In a job each rank checksums the files it wrote, so the added time
per save is this figure for one rank's share.

    python benchmarks/checkpoint_checksums.py [--megabytes 512] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalong.checkpoint import checksums  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512, help="checkpoint size (default 512)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args()

    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose

    tensors = {f"layer{i}.weight": torch.randn(args.megabytes * 2**20 // 4 // 16) for i in range(16)}
    directory = tempfile.mkdtemp(prefix="megalong-checksums-", dir=args.dir)
    try:
        write = timed(lambda: dcp.save(tensors, checkpoint_id=directory, no_dist=True))
        files = checksums.checkpoint_files(directory)
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        recorded = {}
        record = timed(lambda: recorded.update(checksums.records(directory, files)))
        checksums.write(directory, recorded)
        found = []
        verify = timed(lambda: found.extend(checksums.problems(directory, checksums.read(directory), files)))
        assert not found, found
        target = {name: torch.empty_like(t) for name, t in tensors.items()}
        read = timed(lambda: dcp.load(target, checkpoint_id=directory, no_dist=True))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    gb = size / 1e9
    print(f"checkpoint: {len(files)} files, {gb:.2f} GB in {directory}")
    print(f"write (baseline)      {write:7.2f} s  {gb / write:6.2f} GB/s")
    print(f"record checksums      {record:7.2f} s  {gb / record:6.2f} GB/s  = {record / write:.2f} x the write")
    print(f"read (baseline)       {read:7.2f} s  {gb / read:6.2f} GB/s")
    print(f"verify checksums      {verify:7.2f} s  {gb / verify:6.2f} GB/s  = {verify / read:.2f} x the read")


if __name__ == "__main__":
    main()
