"""``--input-format mds``: ProLong's released data (mosaicml-streaming) -> indexed datasets.

Two layouts, told apart by the columns of the shards (ProLong's README, "Download and
prepare raw data", and its packer, datatools' ``scripts/pack.py``):

* ``documents`` (the raw tokenized sets: ``domain``, ``input_ids``, ``length``; Llama-3
  tokens without BOS/EOS): one document per record, with the usual BOS/EOS policy and the
  length and dedup filters; dedup compares the token ids.
* ``packed`` (``prolong-data-64K/512K``: ``input_ids``, ``indices``, ``domain``, and
  ``mask`` in ``prolong-ultrachat-64K``): one stored document per packed sample, its tokens
  exactly as released (nothing added, nothing re-cut), each ``indices`` span one attention
  document, the mask as target flags (megalong.data.packed). The filters do not apply.

A megalong shard is a run of whole MDS shards. Every bad input is counted by reason with the
shard file and sample number, or stops a ``--strict`` run: an MDS directory without a
readable ``index.json``, a shard file that is missing, corrupt or cut short (the samples
lying wholly before the cut are kept), a sample that does not decode, tokens outside the
vocabulary, spans that do not tile the sample, a mask of the wrong length.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from megalong.data.mds import MdsError, MdsShard, ShardReader, read_index
from megalong.data.packed import sequences_of_sample
from megalong.data.preprocess.sources import InputError

LAYOUTS = ("documents", "packed", "packed-mask")
SHARD_KINDS = tuple(f"mds-{layout}" for layout in LAYOUTS)
COLUMNS = ["input_ids", "indices", "mask", "length", "domain"]


def layout_of(columns: list[str]) -> str:
    if "indices" not in columns:
        return "documents"
    return "packed-mask" if "mask" in columns else "packed"


def plan_mds(dataset: Path) -> tuple[list[tuple[str, int, list]], str | None, tuple | None]:
    """The shards of one MDS dataset directory as units ``(kind, bytes, item)`` and its
    layout, or ``([], None, (path, reason, detail))`` when its index cannot be read."""
    try:
        shards = read_index(dataset)
    except MdsError as err:
        return [], None, (str(dataset / "index.json"), "unreadable_index", str(err))
    without_tokens = [s for s in shards if "input_ids" not in s.column_names]
    if without_tokens:
        raise InputError(f"{without_tokens[0].path}: no input_ids column (columns: "
                         f"{', '.join(without_tokens[0].column_names)}); --input-format mds reads tokenized data")
    layouts = {layout_of(s.column_names) for s in shards}
    if len(layouts) > 1:
        raise InputError(f"{dataset}: shards of different layouts ({', '.join(sorted(layouts))}); "
                         "give each kind of data its own output")
    layout = layouts.pop() if layouts else None
    units = [(f"mds-{layout}", s.size_on_disk, [str(s.path), str(dataset), s.number, s.info]) for s in shards]
    return units, layout, None


def _checked_tokens(sample: dict, vocab_size: int) -> tuple[np.ndarray | None, str, str]:
    """(tokens, "", "") for usable input_ids, else (None, skip reason, detail)."""
    ids = sample.get("input_ids")
    if ids is None:
        return None, "bad_tokens", "no input_ids column"
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size == 0:
        return None, "bad_tokens", f"input_ids of shape {ids.shape} and dtype {ids.dtype}, not a non-empty 1-D integer array"
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        return None, "bad_tokens", f"token id {low if low < 0 else high} outside the tokenizer's {vocab_size:,} ids"
    if "length" in sample and int(sample["length"]) != ids.size:
        return None, "length_mismatch", f"length {int(sample['length'])}, {ids.size} input_ids"
    return ids, "", ""


def _span_problem(indices, count: int) -> str:
    """Why ``indices`` do not tile [0, count), or "" when they do."""
    spans = np.asarray(indices)
    if spans.ndim != 2 or spans.shape[1] != 2 or spans.dtype.kind not in "iu" or spans.shape[0] == 0:
        return f"indices of shape {spans.shape}, not (k, 2) integer spans"
    spans = spans.astype(np.int64)
    starts, ends = spans[:, 0], spans[:, 1]
    bad = np.flatnonzero(ends <= starts)
    if bad.size:
        return f"span {bad[0]} ({starts[bad[0]]}, {ends[bad[0]]}) is empty or reversed"
    if ends.max() > count:
        k = int(np.argmax(ends > count))
        return f"span {k} ({starts[k]}, {ends[k]}) ends past the sample's {count} tokens"
    if starts[0] != 0 or ends[-1] != count:
        return f"the spans cover [{starts[0]}, {ends[-1]}), not the sample's [0, {count})"
    joints = np.flatnonzero(starts[1:] != ends[:-1])
    if joints.size:
        k = int(joints[0])
        return f"span {k} ends at {ends[k]} but span {k + 1} starts at {starts[k + 1]}"
    return ""


class MdsShardConverter:
    """Converts the MDS shards of one megalong shard. ``add_document(tokens, where, bytes)``
    takes raw documents (the BOS/EOS policy and filters are applied by the caller's batcher);
    packed samples go straight to ``writer``."""

    def __init__(self, kind: str, writer, skips, vocab_size: int, add_document, progress):
        self.layout = kind.removeprefix("mds-")
        self.writer, self.skips, self.vocab_size = writer, skips, vocab_size
        self.add_document, self.progress = add_document, progress
        self.domains: Counter = Counter()
        self.spans = 0

    def convert(self, items: list) -> None:
        for path, dataset, number, info in items:
            shard = MdsShard(Path(dataset), number, info)
            try:
                reader = ShardReader(shard, COLUMNS)
            except MdsError as err:
                self.skips.skip("unreadable_shard", path, str(err).removeprefix(f"{path}: "), count=max(shard.samples, 1))
                continue
            if reader.readable < reader.count:
                self.skips.skip("unreadable_shard", path,
                                f"cut short: samples {reader.readable} to {reader.count - 1} lie past its end",
                                sample=reader.readable, count=reader.count - reader.readable)
            for index in range(reader.readable):
                self._sample(reader, path, index)

    def _sample(self, reader: ShardReader, path: str, index: int) -> None:
        try:
            sample = reader.sample(index)
        except MdsError as err:
            self.skips.skip("corrupt_sample", path, str(err), sample=index)
            return
        tokens, reason, detail = _checked_tokens(sample, self.vocab_size)
        if tokens is None:
            self.skips.skip(reason, path, detail, sample=index)
            return
        if tokens.dtype == np.uint32:  # ids are below the vocabulary size: int32 has the same bits
            tokens = tokens.view(np.int32)
        domain = str(sample.get("domain", ""))
        size = reader.sample_bytes(index)
        if self.layout == "documents":
            self.domains[domain] += 1  # records read; the length and dedup filters come after
            self.add_document(tokens, (path, "sample", index), size)
            return
        problem = _span_problem(sample.get("indices"), tokens.size)
        if problem:
            self.skips.skip("bad_spans", path, problem, sample=index)
            return
        target = None
        if self.layout == "packed-mask":
            mask = np.asarray(sample.get("mask"))
            if mask.shape != tokens.shape:
                self.skips.skip("mask_length", path, f"mask of shape {mask.shape} for {tokens.size} input_ids", sample=index)
                return
            target = mask != 0
        spans = np.asarray(sample["indices"], dtype=np.int64)
        lengths, modes = sequences_of_sample(spans[:, 1] - spans[:, 0], target)
        self.writer.add_documents(tokens, lengths, [lengths.size], modes)
        self.domains[domain] += 1
        self.spans += spans.shape[0]
        if self.progress is not None:
            self.progress(0, 1, int(tokens.size))  # input bytes: counted once per shard, by the worker
