"""Code repositories from per-file Parquet rows (The Stack v1: ``content``,
``max_stars_repo_name``, ``max_stars_repo_path``, ...), grouped by repository without holding
the dataset in memory.

The rows of one repository are spread over the whole dataset, so grouping is an external
hash partition in two kinds of shards of the ordinary plan (resumable and split over
workers and array tasks like any shard):

1. ``repo-rows-partition``, one per input Parquet file: its row groups are read one at a
   time (repository, path and content columns only); each becomes one Arrow record batch,
   sorted by bucket = crc32(repository) mod B, written to ``<work>/repo_rows_<shard>.arrow``
   with the bucket boundaries of every batch in ``.offsets.npy``. Rows without a repository
   name or path, or whose content is not text, are counted with their ``file row N``.
2. ``repo-rows-group``, one per bucket, after every partition shard is done: it memory-maps
   each partition file, takes its bucket's slice of every batch (the only rows it copies),
   groups them by repository and makes each repository one document with the filters of
   ``--input-format code-repos`` (code_repos.rows_document).

B is chosen from the input size so that a bucket holds about one shard's worth of rows
(--shard-size-mb): the memory of a group shard. The cost is one open of every partition file
per bucket (inputs x buckets opens), so very large inputs want a larger --shard-size-mb.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from megalong.data.preprocess.code_repos import rows_document

PARTITION, GROUP = "repo-rows-partition", "repo-rows-group"


def partition_path(work_dir: str | Path, shard_id: int) -> Path:
    return Path(work_dir) / f"repo_rows_{shard_id:06d}.arrow"


def plan_repo_rows(files: list[Path], target_bytes: int, columns: tuple[str, str, str]) -> list[tuple[str, list, int]]:
    """(kind, items, input bytes) of the partition shards (one per file) then the group shards.
    A group shard's items: ``[[bucket, number of buckets, [partition shard positions]]]``
    (positions among the plan's shards: the partition shards come first)."""
    import pyarrow.parquet as pq

    sizes = []
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
            sizes.append(sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)))
        except Exception:  # unreadable: the partition shard reports it with its path
            sizes.append(0)
    buckets = max(1, math.ceil(sum(sizes) / max(1, target_bytes)))
    partitions = [(PARTITION, [[str(path), buckets, *columns]], size) for path, size in zip(files, sizes)]
    groups = [(GROUP, [[bucket, buckets, list(range(len(files)))]], 0) for bucket in range(buckets)]
    return partitions + groups


def bucket_of(repos: list[str], buckets: int) -> np.ndarray:
    return np.fromiter((zlib.crc32(r.encode("utf-8")) % buckets for r in repos), dtype=np.int64, count=len(repos))


def partition_file(item: list, out: Path, skips) -> None:
    """Partition shard: one input file's rows into ``out`` (Arrow IPC file, one batch per row
    group, sorted by bucket) and ``out.offsets.npy`` ([batches, buckets + 1] row offsets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, buckets, repo_key, path_key, content_key = item
    columns = [repo_key, path_key, content_key]
    schema = pa.schema([("repo", pa.string()), ("path", pa.string()), ("content", pa.string())])
    offsets = []
    tmp = out.with_name(out.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        try:
            parquet = pq.ParquetFile(path)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
        except Exception as err:  # pyarrow raises several types for an unreadable file
            skips.skip("unreadable_file", path, str(err))
            parquet, missing = None, []
        if missing:
            skips.skip("missing_key", path, f"no column {', '.join(map(repr, missing))} "
                       f"(columns: {', '.join(parquet.schema_arrow.names)})", count=parquet.metadata.num_rows)
            parquet = None
        first_row = 0
        for group in range(parquet.metadata.num_row_groups if parquet is not None else 0):
            rows = parquet.metadata.row_group(group).num_rows
            try:
                table = parquet.read_row_group(group, columns=columns)
            except Exception as err:
                skips.skip("unreadable_file", path, f"row group {group}: {err}", row=first_row, count=rows)
                first_row += rows
                continue
            repos, paths, contents = (table.column(c).to_pylist() for c in columns)
            keep = []
            for index, (repo, relative, content) in enumerate(zip(repos, paths, contents)):
                if not isinstance(repo, str) or not repo or not isinstance(relative, str) or not relative:
                    skips.skip("missing_key", path, f"no {repo_key} / {path_key}", row=first_row + index)
                elif not isinstance(content, str):
                    skips.skip("text_not_string" if content is not None else "missing_key", path,
                               f"{content_key} is {type(content).__name__}", row=first_row + index)
                else:
                    keep.append(index)
            first_row += rows
            repos = [repos[i] for i in keep]
            bucket = bucket_of(repos, buckets)
            order = np.argsort(bucket, kind="stable")
            writer.write_batch(pa.record_batch([pa.array([repos[i] for i in order], pa.string()),
                                                pa.array([paths[keep[i]] for i in order], pa.string()),
                                                pa.array([contents[keep[i]] for i in order], pa.string())],
                                               schema=schema))
            offsets.append(np.searchsorted(bucket[order], np.arange(buckets + 1), side="left"))
    np.save(str(out) + ".offsets.npy", np.asarray(offsets, dtype=np.int64).reshape(-1, buckets + 1))
    tmp.replace(out)


def group_documents(item: list, work_dir: Path, cfg, skips) -> Iterator[tuple[str, tuple]]:
    """Group shard: ``(document, where)`` of every repository of one bucket."""
    import pyarrow as pa

    bucket, _, partition_ids = item
    pieces = []
    for shard_id in partition_ids:
        out = partition_path(work_dir, shard_id)
        offsets = np.load(str(out) + ".offsets.npy")
        with pa.memory_map(str(out)) as source:
            reader = pa.ipc.open_file(source)
            for batch_number in range(reader.num_record_batches):
                start, stop = offsets[batch_number, bucket], offsets[batch_number, bucket + 1]
                if stop > start:
                    pieces.append(reader.get_batch(batch_number).slice(start, stop - start).to_pylist())
    rows: dict[str, list[tuple[str, str]]] = {}
    for piece in pieces:
        for row in piece:
            rows.setdefault(row["repo"], []).append((row["path"], row["content"]))
    del pieces
    for repo in sorted(rows):
        text = rows_document(repo, rows.pop(repo), cfg.repo_max_file_bytes, cfg.repo_max_bytes,
                             skips.leave_out_repo_file)
        if not text:
            skips.skip("empty_text", repo, "no usable source file in the repository")
            continue
        yield text, (repo, "file", None)
