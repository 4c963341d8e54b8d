#!/usr/bin/env python
"""MDS -> indexed dataset conversion against reading the same MDS with mosaicml-streaming alone.

The floor is what the library itself costs to hand over every sample of the dataset:
``streaming.LocalDataset`` over the shards, each sample decoded (``ds[i]``), its ``input_ids``
touched. It writes nothing, while a conversion must write its output; so a second reference,
measured in the same run, is the floor plus one plain copy of the dataset's files
(``shutil.copyfile`` of every shard, fsync'ed like the merged output): reading the input once
and writing its bytes once. megalong's side is ``megalong preprocess --input-format mds`` end to end, one worker
(like the floor, one process): reading and checking every sample with megalong's own MDS
reader, writing the shard files, and the merge into ``PREFIX.bin/.idx/.json``.

Both layouts of ProLong's released data, written with streaming's own ``MDSWriter`` in
ProLong's schemas (tests/data/mds_samples.py):
* packed: samples of --pack-length tokens, documents of ~1,500 tokens as spans;
* documents (the raw tokenized sets): documents of ~1,500 tokens, BOS/EOS added by megalong.

``streaming`` cannot be imported next to megalong's CPU torch (megalong/data/mds.py says why),
so the writing and the floor run in the Python given by --streaming-python, a separate
environment with the library (``python -m venv /tmp/venv-streaming &&
/tmp/venv-streaming/bin/pip install mosaicml-streaming==0.13.0``), on the same files.

    OMP_NUM_THREADS=1 python benchmarks/mds_convert.py --streaming-python /tmp/venv-streaming/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Runs in the streaming environment: write both datasets, then time reading each (best of 3).
STREAMING_SIDE = r"""
import json, sys, time
import numpy as np
from streaming import LocalDataset, MDSWriter
sys.path.insert(0, sys.argv[1])
from tests.data.mds_samples import PACKED_COLUMNS, RAW_COLUMNS
out, tokens, pack_length = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
lengths = rng.integers(100, 3000, size=tokens // 1000 + 10)
ids = rng.integers(0, 128000, size=int(lengths.sum()), dtype=np.uint32)
starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
with MDSWriter(out=f"{out}/documents", columns=RAW_COLUMNS) as writer:
    used = 0
    for start, length in zip(starts, lengths):
        if used >= tokens:
            break
        writer.write({"domain": "fineweb-edu", "input_ids": ids[start:start + length], "length": np.int32(length)})
        used += int(length)
with MDSWriter(out=f"{out}/packed", columns=PACKED_COLUMNS) as writer:
    for s in range(tokens // pack_length):
        lo, hi = s * pack_length, (s + 1) * pack_length
        cuts = np.unique(np.clip(np.concatenate([[lo], starts[(starts > lo) & (starts < hi)], [hi]]), lo, hi)) - lo
        writer.write({"input_ids": ids[lo:hi], "indices": np.stack([cuts[:-1], cuts[1:]], 1).astype(np.uint32),
                      "length": pack_length, "domain": "book-65536"})
result = {}
for layout in ("documents", "packed"):
    best = None
    for _ in range(3):
        began = time.perf_counter()
        dataset = LocalDataset(f"{out}/{layout}")
        count = 0
        for i in range(len(dataset)):
            count += len(dataset[i]["input_ids"])
        seconds = time.perf_counter() - began
        best = seconds if best is None else min(best, seconds)
    result[layout] = {"samples": len(dataset), "tokens": count, "seconds": best}
print(json.dumps(result))
"""


def copy_files(dataset: Path, target: Path) -> float:
    """Best of 3: every file of the dataset copied once, and flushed to disk."""
    import shutil

    best = None
    for attempt in range(3):
        out = target / str(attempt)
        out.mkdir(parents=True)
        began = time.perf_counter()
        for path in sorted(dataset.iterdir()):
            shutil.copyfile(path, out / path.name)
            with open(out / path.name, "rb+") as handle:
                os.fsync(handle.fileno())
        seconds = time.perf_counter() - began
        best = seconds if best is None else min(best, seconds)
        shutil.rmtree(out)
    return best


def megalong_convert(dataset: Path, prefix: Path) -> float:
    from megalong.data.preprocess import PreprocessConfig, run
    from megalong.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("llama3")
    best = None
    for attempt in range(3):
        cfg = PreprocessConfig(inputs=[str(dataset)], input_format="mds", output_prefix=f"{prefix}_{attempt}",
                               tokenizer="llama3", workers=1)
        began = time.perf_counter()
        run(cfg, tokenizer, progress_stream=open(os.devnull, "w"))
        seconds = time.perf_counter() - began
        best = seconds if best is None else min(best, seconds)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streaming-python", default=sys.executable,
                        help="a Python that can import mosaicml-streaming (default: this one)")
    parser.add_argument("--tokens", type=float, default=32e6, help="tokens per dataset (default 32M = 128 MB)")
    parser.add_argument("--pack-length", type=int, default=65536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        print(f"writing {args.tokens / 1e6:.0f}M tokens per layout with streaming's MDSWriter and timing "
              f"streaming's LocalDataset on them ({args.streaming_python}) ...", flush=True)
        done = subprocess.run([args.streaming_python, "-c", STREAMING_SIDE, str(REPO_ROOT), str(scratch),
                               str(int(args.tokens)), str(args.pack_length)],
                              check=True, capture_output=True, text=True)
        floor = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{'layout':<10} {'samples':>8} {'tokens':>12} {'streaming read s':>17} {'+ copy s':>9} "
              f"{'megalong s':>11} {'vs read':>8} {'vs read+copy':>13} {'megalong Mtok/s':>16}")
        for layout in ("documents", "packed"):
            seconds = megalong_convert(scratch / layout, scratch / f"out_{layout}")
            copy = copy_files(scratch / layout, scratch / f"copy_{layout}")
            f = floor[layout]
            print(f"{layout:<10} {f['samples']:>8,} {f['tokens']:>12,} {f['seconds']:>17.2f} {copy:>9.2f} "
                  f"{seconds:>11.2f} {seconds / f['seconds']:>8.2f} {seconds / (f['seconds'] + copy):>13.2f} "
                  f"{f['tokens'] / seconds / 1e6:>16.1f}")
        print("megalong = the whole conversion (read, check, write shards, merge, fsync), one worker; ratios "
              "against streaming reading the same samples, and against that plus one copy of the files; "
              "best of 3 runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
