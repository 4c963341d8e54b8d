"""Merge finished shards, in plan order, into one ``<prefix>.bin/.idx`` (+ the ``.json`` sidecar).

Without deduplication the shards' token bytes are copied back to back. With it, every
document's 64-bit text hash (written by the workers) is compared across the whole corpus
and only the first occurrence in input order is kept; that needs 8 bytes per document in
memory (a 64-bit hash has a ~1e-3 chance of one false match per 2e8 documents).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from megalong.data.preprocess.indexed_writer import (IndexedDatasetWriter, bin_path, idx_path, read_grouping, read_index,
                                                     sidecar_path)
from megalong.data.preprocess.report import EXAMPLES_PER_REASON, LengthHistogram, resolve_examples
from megalong.data.preprocess.worker import shard_prefix


class EmptyDatasetError(ValueError):
    """Every record was skipped or filtered out."""


def _first_occurrences(work_dir: Path, num_shards: int) -> list[np.ndarray]:
    """Per shard, a boolean mask of the documents that are not duplicates of earlier ones."""
    hashes = [np.fromfile(f"{shard_prefix(work_dir, i)}.hashes", dtype=np.uint64) for i in range(num_shards)]
    sizes = [h.size for h in hashes]
    everything = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    del hashes
    _, first = np.unique(everything, return_index=True)
    keep = np.zeros(everything.size, dtype=bool)
    keep[first] = True
    return np.split(keep, np.cumsum(sizes)[:-1]) if sizes else []


def _copy_kept(writer: IndexedDatasetWriter, prefix: Path, lengths: np.ndarray, keep: np.ndarray, itemsize: int) -> None:
    """Append the kept documents of one shard, copying contiguous runs of them at once."""
    starts = (np.cumsum(lengths, dtype=np.int64) - lengths) * itemsize
    change = np.flatnonzero(np.diff(keep.astype(np.int8))) + 1  # where runs of equal keep values begin
    run_starts = np.concatenate([[0], change]).astype(np.int64)
    run_ends = np.concatenate([change, [keep.size]]).astype(np.int64)
    with open(bin_path(prefix), "rb") as handle:
        for first, last in zip(run_starts, run_ends):
            if keep.size and keep[first]:
                handle.seek(int(starts[first]))
                writer.append_from(handle, lengths[first:last])


def _add_examples(kept: list[dict], new: list[dict]) -> None:
    """Append ``new`` examples, keeping at most 5 x EXAMPLES_PER_REASON per reason in all."""
    per_reason = Counter(example["reason"] for example in kept)
    for example in new:
        if per_reason[example["reason"]] < 5 * EXAMPLES_PER_REASON:
            per_reason[example["reason"]] += 1
            kept.append(example)


def _document_lengths(sequence_lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Tokens per document of documents made of ``counts`` consecutive sequences."""
    if counts.size == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts[:-1], dtype=np.int64)])
    return np.add.reduceat(np.asarray(sequence_lengths, dtype=np.int64), starts)


def merge_shards(work_dir: str | Path, num_shards: int, output_prefix: str | Path, dedup: bool,
                 grouped: bool = False, multimodal: bool = False) -> dict:
    """Write the merged dataset atomically; return the counts for the sidecar. ``grouped``:
    the shards' documents are made of several sequences (packed samples), with per-sequence
    modes when ``multimodal``."""
    work_dir = Path(work_dir)
    keep_masks = _first_occurrences(work_dir, num_shards) if dedup else None
    histogram = LengthHistogram()
    skipped: Counter = Counter()
    repo_file_skips: Counter = Counter()
    examples: list[dict] = []
    repo_file_examples: list[dict] = []
    input_bytes = 0
    domains: Counter = Counter()
    spans = 0
    writer = IndexedDatasetWriter(output_prefix, multimodal=multimodal)
    try:
        for shard_id in range(num_shards):
            prefix = shard_prefix(work_dir, shard_id)
            stats = json.loads(sidecar_path(prefix).read_text(encoding="utf-8"))
            skipped.update(stats["skipped"])
            repo_file_skips.update(stats.get("repo_files_skipped", {}))
            input_bytes += stats["input_bytes"]
            domains.update(stats.get("mds_domains", {}))
            spans += stats.get("spans", 0)
            _add_examples(examples, stats["skip_examples"])
            _add_examples(repo_file_examples, stats.get("repo_file_examples", []))
            dtype, lengths = read_index(prefix)
            if grouped:
                counts, modes = read_grouping(prefix, multimodal)
                with open(bin_path(prefix), "rb") as handle:
                    writer.append_from(handle, lengths, counts, modes)
                histogram.add(_document_lengths(lengths, counts))
            elif keep_masks is None:
                with open(bin_path(prefix), "rb") as handle:
                    writer.append_from(handle, lengths)
                histogram.add(np.asarray(lengths))
            else:
                keep = keep_masks[shard_id]
                if keep.size != lengths.size:
                    raise ValueError(f"{prefix}.hashes has {keep.size} entries for {lengths.size} documents")
                duplicates = int(keep.size - keep.sum())
                if duplicates:
                    skipped["duplicate"] += duplicates
                _copy_kept(writer, prefix, np.asarray(lengths, dtype=np.int64), keep, dtype.itemsize)
                histogram.add(np.asarray(lengths)[keep])
            del lengths
        if writer.num_documents == 0:
            # Megatron-Core cannot open an empty .bin, and an empty dataset is never what was meant.
            raise EmptyDatasetError(
                f"no document is left to write to {output_prefix}: skipped by reason {dict(skipped)}"
                + (f", repository files left out {dict(repo_file_skips)}" if repo_file_skips else ""))
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return {
        "documents": writer.num_documents,
        "tokens": writer.num_tokens,
        "input_bytes": input_bytes,
        "min_length": histogram.min_length,
        "max_length": histogram.max_length,
        "mean_length": (writer.num_tokens / writer.num_documents) if writer.num_documents else None,
        "length_histogram": histogram.to_list(),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": int(sum(skipped.values())),
        "skip_examples": resolve_examples(examples),
        "repo_files_skipped": dict(sorted(repo_file_skips.items())),
        "repo_file_examples": repo_file_examples,
        **({"mds_domains": dict(sorted(domains.items()))} if domains else {}),
        **({"spans": spans} if grouped else {}),
    }


def outputs_exist(prefix: str | Path) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file() and sidecar_path(prefix).is_file()
