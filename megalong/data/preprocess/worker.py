"""Tokenize one shard into ``<work_dir>/shard_NNNNNN.{bin,idx,hashes,json}``.

The worker reads its piece of the input itself (a byte range, row groups, files) and writes
its own output, so nothing but a small stats dict crosses between processes. Documents are
tokenized in batches of about BATCH_CHARS characters and written with numpy.
The ``.json`` stats file is written last, atomically: its presence means the shard is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from megalong.data.preprocess.config import PreprocessConfig
from megalong.data.preprocess.indexed_writer import IndexedDatasetWriter, sidecar_path, tmp_tag
from megalong.data.preprocess.mds_input import SHARD_KINDS as MDS_SHARD_KINDS
from megalong.data.preprocess.mds_input import MdsShardConverter
from megalong.data.preprocess import repo_rows
from megalong.data.preprocess.readers import iter_documents
from megalong.data.preprocess.report import SkipLog
from megalong.data.preprocess.sources import Shard

BATCH_CHARS = 1 << 20

# progress(input_bytes, documents, tokens): increments, called about once per batch.
Progress = Callable[[int, int, int], None]


def shard_prefix(work_dir: str | Path, shard_id: int) -> Path:
    return Path(work_dir) / f"shard_{shard_id:06d}"


def shard_is_done(work_dir: str | Path, shard_id: int) -> bool:
    """A shard is done when its stats file exists and its files have the recorded sizes
    (shards are not fsync'ed, for speed: after a machine crash a shard whose data never
    reached the disk fails this check and is tokenized again)."""
    prefix = shard_prefix(work_dir, shard_id)
    try:
        stats = json.loads(sidecar_path(prefix).read_text(encoding="utf-8"))
        return all(os.path.getsize(f"{prefix}{ext}") == size for ext, size in stats["file_sizes"].items())
    except (OSError, ValueError, KeyError):
        return False


def write_json_atomic(path: str | Path, data: dict, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{tmp_tag()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


class _ShardTokenizer:
    def __init__(self, cfg: PreprocessConfig, tokenizer, writer: IndexedDatasetWriter, skips: SkipLog,
                 hashes, progress: Progress | None, input_budget: int):
        self.cfg, self.tokenizer, self.writer, self.skips = cfg, tokenizer, writer, skips
        self.hashes, self.progress = hashes, progress
        self.prefix_tokens = np.array([tokenizer.bos_id] if cfg.add_bos else [], dtype=np.int32)
        self.suffix_tokens = np.array([tokenizer.eos_id] if cfg.add_eos else [], dtype=np.int32)
        self.extra = self.prefix_tokens.size + self.suffix_tokens.size
        self.input_budget = input_budget  # progress never reports more input bytes than the shard has
        self.texts: list[str] = []
        self.wheres: list[tuple] = []
        self.chars = 0

    def add(self, text: str, where: tuple) -> None:
        self.texts.append(text)
        self.wheres.append(where)
        self.chars += len(text)
        if self.chars >= BATCH_CHARS:
            self.flush()

    def add_tokens(self, tokens: np.ndarray, where: tuple, input_bytes: int) -> None:
        """A document already tokenized (MDS input): the policy and filters still apply, and
        dedup compares token ids. Not mixed with ``add`` in one shard."""
        self.texts.append(tokens)
        self.wheres.append(where)
        self.chars += input_bytes
        if self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        pretokenized = isinstance(self.texts[0], np.ndarray)
        arrays = self.texts if pretokenized else self.tokenizer.encode_batch_arrays(self.texts)
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays)) + self.extra
        keep = lengths > 0  # text that tokenizes to nothing, with no BOS/EOS, is not a document
        if self.cfg.min_tokens:
            keep &= lengths >= self.cfg.min_tokens
        if self.cfg.max_tokens:
            keep &= lengths <= self.cfg.max_tokens
        pieces = []
        kept_texts = []
        for index in range(len(arrays)):
            if not keep[index]:
                if lengths[index] == 0:
                    reason = "empty_text"
                else:
                    reason = "too_short" if lengths[index] < self.cfg.min_tokens else "too_long"
                path, kind, value = self.wheres[index]
                self.skips.skip(reason, path, f"{int(lengths[index])} tokens", **({kind: value} if kind != "file" else {}))
                continue
            if self.extra:
                pieces += (self.prefix_tokens, arrays[index], self.suffix_tokens)
            else:
                pieces.append(arrays[index])
            if self.hashes is not None:
                kept_texts.append(self.texts[index])
        kept_lengths = lengths[keep]
        if kept_lengths.size:
            self.writer.add_documents(np.concatenate(pieces).astype(np.int32, copy=False), kept_lengths)
        if self.hashes is not None and kept_texts:
            keys = (np.asarray(t, dtype=np.int32).tobytes() if pretokenized else t.encode("utf-8") for t in kept_texts)
            digests = b"".join(hashlib.blake2b(key, digest_size=8).digest() for key in keys)
            self.hashes.write(digests)
        if self.progress is not None:
            consumed = min(self.chars, self.input_budget)
            self.input_budget -= consumed
            self.progress(consumed, int(kept_lengths.size), int(kept_lengths.sum()))
        self.texts, self.wheres, self.chars = [], [], 0


def tokenize_shard(shard_id: int, shard: Shard, cfg: PreprocessConfig, tokenizer, work_dir: str | Path,
                   progress: Progress | None = None) -> dict:
    """Tokenize ``shard`` and return its stats (also written to the shard's ``.json``)."""
    prefix = shard_prefix(work_dir, shard_id)
    skips = SkipLog(cfg.strict)
    hashes_path = Path(f"{prefix}.hashes")
    hashes_tmp = hashes_path.with_name(f"{hashes_path.name}.tmp.{tmp_tag()}")
    writer = IndexedDatasetWriter(prefix, multimodal=shard.kind == "mds-packed-mask")
    hashes = open(hashes_tmp, "wb") if cfg.dedup else None
    extra = {}
    try:
        batcher = _ShardTokenizer(cfg, tokenizer, writer, skips, hashes, progress, shard.input_bytes)
        if shard.kind == repo_rows.PARTITION:
            repo_rows.partition_file(shard.items[0], repo_rows.partition_path(work_dir, shard_id), skips)
        elif shard.kind == repo_rows.GROUP:
            for text, where in repo_rows.group_documents(shard.items[0], Path(work_dir), cfg, skips):
                batcher.add(text, where)
        elif shard.kind in MDS_SHARD_KINDS:
            converter = MdsShardConverter(shard.kind, writer, skips, tokenizer.vocab_size, batcher.add_tokens, progress)
            converter.convert(shard.items)
            extra = {"mds_domains": dict(converter.domains), "spans": converter.spans}
        else:
            for text, where in iter_documents(shard, cfg, skips):
                batcher.add(text, where)
        batcher.flush()
        if hashes is not None:
            hashes.close()
            os.replace(hashes_tmp, hashes_path)
        stats = {"shard": shard_id, "documents": writer.num_documents, "tokens": writer.num_tokens,
                 "input_bytes": shard.input_bytes, **skips.to_dict(), **extra}
        writer.finalize(durable=False)
    except BaseException:
        writer.abort()
        if hashes is not None:
            hashes.close()
            hashes_tmp.unlink(missing_ok=True)
        raise
    if progress is not None and batcher.input_budget:
        progress(batcher.input_budget, 0, 0)
    stats["file_sizes"] = {ext: os.path.getsize(f"{prefix}{ext}") for ext in (".bin", ".idx")
                           + ((".hashes",) if cfg.dedup else ())}
    write_json_atomic(f"{prefix}.json", stats, durable=False)
    return stats
