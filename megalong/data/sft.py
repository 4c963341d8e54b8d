"""SFT chat data: Llama-3 chat rendering, assistant-only targets, chat indexed datasets.

A conversation is rendered exactly as Llama-3-Instruct's chat template does::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>...

Loss targets are the assistant turns: each assistant message's content tokens and the
``<|eot_id|>`` that closes it (the model must learn to stop). Headers, system and user
turns are context only.

On disk a chat dataset is a Megatron-Core indexed dataset (``.bin/.idx``) written with
``multimodal=True``: one *document* per conversation, made of *sequences* that alternate
between context and target, each sequence's mode = 1 for targets and 0 for context. That
keeps the per-token loss mask in Megatron's own format (no side file to keep in step)
and lets :mod:`megalong.data.packing` pack whole conversations by document length. A JSON
sidecar ``<prefix>.json`` with ``"kind": "sft-chat"`` marks the layout so a plain
pre-training dataset is never misread as chat data.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SIDECAR_KIND = "sft-chat"
ROLES = ("system", "user", "assistant", "ipython", "tool")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad role, content, or no assistant turn)."""


def render_conversation(messages, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a conversation in the Llama-3 chat format and its target mask.

    ``tokenizer`` follows megalong's Tokenizer contract (``encode``, ``token_id``,
    ``bos_id``). Returns ``(tokens int64 [n], is_target bool [n])``.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    start_header = tokenizer.token_id("<|start_header_id|>")
    end_header = tokenizer.token_id("<|end_header_id|>")
    end_of_turn = tokenizer.token_id("<|eot_id|>")
    double_newline = tokenizer.encode("\n\n")
    tokens: list[int] = []
    target: list[bool] = []
    if tokenizer.bos_id is not None:
        tokens.append(int(tokenizer.bos_id))
        target.append(False)
    has_assistant = False
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"message {turn} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {turn} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {turn} ({role}) has no text content")
        header = [start_header, *tokenizer.encode(role), end_header, *double_newline]
        tokens.extend(header)
        target.extend([False] * len(header))
        body = [*tokenizer.encode(content.strip()), end_of_turn]
        is_assistant = role == "assistant"
        has_assistant |= is_assistant and bool(content.strip())
        tokens.extend(body)
        target.extend([is_assistant] * len(body))
    if not has_assistant:
        raise ChatFormatError("conversation has no assistant turn with text (nothing to learn from)")
    return np.asarray(tokens, dtype=np.int64), np.asarray(target, dtype=bool)


def segments(is_target: np.ndarray) -> tuple[list[int], list[int]]:
    """Run lengths of a target mask and each run's mode (1 = target)."""
    change = np.flatnonzero(np.diff(is_target.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [is_target.size]])
    lengths = np.diff(bounds).tolist()
    modes = [int(is_target[b]) for b in bounds[:-1]]
    return lengths, modes


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    if path.suffix == ".zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    return open(path, "r", encoding="utf-8", errors="strict")


@dataclass
class ChatWriteReport:
    conversations: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    skipped_examples: list = field(default_factory=list)  # "file:line: reason" (first 20)

    def skip(self, where: str, reason: str, strict: bool) -> None:
        if strict:
            raise ChatFormatError(f"{where}: {reason}")
        key = reason.split(";")[0]
        self.skipped[key] = self.skipped.get(key, 0) + 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{where}: {reason}")


class _BytesRead:
    """Bytes of plain JSONL read so far (the progress line's ETA)."""

    def __init__(self):
        self.count = 0


def _jsonl_conversations(path: Path, messages_key: str, report: ChatWriteReport, strict: bool, read: _BytesRead):
    """``(where, messages)`` of every line of a chat JSONL file; bad lines are reported."""
    line_no = 0
    try:
        handle = _open_text(path)
    except OSError as err:
        report.skip(str(path), f"cannot read file; {err.strerror}", strict)
        return
    with handle:
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as err:
                report.skip(f"{path}:{line_no + 1}", f"invalid UTF-8; {err.reason}", strict)
                break  # the decoder cannot resynchronize inside a stream: stop this file
            if not line:
                break
            line_no += 1
            read.count += len(line.encode("utf-8"))
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip(where, f"malformed JSON; {err.msg}", strict)
                continue
            if not isinstance(record, dict) or messages_key not in record:
                report.skip(where, f"missing key {messages_key!r}", strict)
                continue
            yield where, record[messages_key]


def _parquet_conversations(path: Path, messages_key: str, report: ChatWriteReport, strict: bool):
    """``(where, messages)`` of every row of a Parquet file with a ``messages_key`` column of
    ``[{role, content}, ...]`` lists (UltraChat-200k's layout), read one row group at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for an unreadable file
        report.skip(str(path), f"cannot read file; {err}", strict)
        return
    if messages_key not in parquet.schema_arrow.names:
        report.skip(str(path), f"missing key {messages_key!r} (columns: {', '.join(parquet.schema_arrow.names)})", strict)
        return
    row = 0
    for group in range(parquet.metadata.num_row_groups):
        try:
            column = parquet.read_row_group(group, columns=[messages_key]).column(0).to_pylist()
        except Exception as err:
            report.skip(f"{path} row group {group}", f"cannot decode; {err}", strict)
            row += parquet.metadata.row_group(group).num_rows
            continue
        for messages in column:
            yield f"{path} row {row}", messages
            row += 1


def write_chat_dataset(inputs, tokenizer, output_prefix: str, messages_key: str = "messages",
                       strict: bool = False, log_every_s: float = 10.0) -> ChatWriteReport:
    """Render chat files into a chat indexed dataset at ``output_prefix``: JSONL (plain, .gz,
    .zst; one ``{messages_key: [...]}`` per line) or Parquet (a ``messages_key`` column, e.g.
    UltraChat-200k's ``messages``).

    A bad record (malformed JSON, missing key, bad role, no assistant turn, invalid UTF-8)
    is skipped and counted with its file:line or file row, or stops the run when ``strict``.
    Outputs are written under temporary names and renamed at the end: a killed run leaves no
    partial dataset (rerun it from the start).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    report = ChatWriteReport()
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=np.int32, multimodal=True)
    started = last_log = time.monotonic()
    # Progress by bytes read is exact only for plain JSONL inputs; others show rates only.
    plain = all(p.suffix not in (".gz", ".zst", ".parquet") for p in inputs)
    total_bytes = sum(p.stat().st_size for p in inputs if p.exists()) if plain else 0
    read = _BytesRead()
    try:
        for path in inputs:
            records = (_parquet_conversations(path, messages_key, report, strict) if path.suffix == ".parquet"
                       else _jsonl_conversations(path, messages_key, report, strict, read))
            for where, messages in records:
                try:
                    tokens, is_target = render_conversation(messages, tokenizer)
                except ChatFormatError as err:
                    report.skip(where, str(err), strict)
                    continue
                lengths, modes = segments(is_target)
                builder.add_document(tokens, lengths, modes)
                report.conversations += 1
                report.tokens += int(tokens.size)
                report.target_tokens += int(is_target.sum())
                now = time.monotonic()
                if now - last_log >= log_every_s:
                    rate = report.tokens / (now - started)
                    eta = ""
                    if total_bytes and read.count:
                        done = read.count / total_bytes
                        eta = f", {done:.0%} done, ETA {(now - started) * (1 - done) / done:.0f} s"
                    log.info("chat data: %s conversations, %s tokens (%.0f tokens/s, %.0f conversations/s%s), at %s",
                             f"{report.conversations:,}", f"{report.tokens:,}", rate,
                             report.conversations / (now - started), eta, where)
                    last_log = now
        builder.finalize(str(tmp) + ".idx")
        sidecar = {
            "kind": SIDECAR_KIND,
            "format": "Megatron-Core indexed dataset, multimodal=True: one document per conversation, "
                      "sequence mode 1 = assistant target tokens, 0 = context",
            "chat_format": "llama3",
            "tokenizer": tokenizer.identity() if hasattr(tokenizer, "identity") else None,
            "inputs": [str(p) for p in inputs],
            "conversations": report.conversations,
            "tokens": report.tokens,
            "target_tokens": report.target_tokens,
            "skipped": report.skipped,
            "skipped_examples": report.skipped_examples,
        }
        Path(str(tmp) + ".json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
        os.replace(str(tmp) + ".bin", str(out) + ".bin")
        os.replace(str(tmp) + ".idx", str(out) + ".idx")
        # The sidecar goes last: a dataset without it is refused by open_chat_dataset.
        os.replace(str(tmp) + ".json", str(out) + ".json")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx", ".json"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        raise
    skipped = sum(report.skipped.values())
    log.info("chat data: wrote %s (%s conversations, %s tokens, %s assistant tokens, %s skipped)",
             out, f"{report.conversations:,}", f"{report.tokens:,}", f"{report.target_tokens:,}", f"{skipped:,}")
    return report


def open_chat_dataset(prefix: str):
    """Open a chat dataset written by :func:`write_chat_dataset` (refuses anything else)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sidecar = Path(prefix + ".json")
    kind = None
    if sidecar.exists():
        try:
            kind = json.loads(sidecar.read_text(encoding="utf-8")).get("kind")
        except (json.JSONDecodeError, AttributeError):
            kind = None
    if kind != SIDECAR_KIND:
        raise ValueError(
            f"{prefix}: not an SFT chat dataset ({sidecar} must exist with \"kind\": \"{SIDECAR_KIND}\"); "
            f"build one with `megalong sft-data` or megalong.data.sft.write_chat_dataset"
        )
    return IndexedDataset(prefix, multimodal=True)


def conversation_lengths(dataset) -> np.ndarray:
    """Token count of every conversation (document) of a chat dataset."""
    seq = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    doc_idx = np.asarray(dataset.document_indices, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(seq)])
    return ends[doc_idx[1:]] - ends[doc_idx[:-1]]


def read_conversation(dataset, document: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and target mask (bool) of conversation ``document``."""
    doc_idx = dataset.document_indices
    first, stop = int(doc_idx[document]), int(doc_idx[document + 1])
    sequences, modes = dataset[first:stop]
    lengths = [s.size for s in sequences]
    tokens = np.concatenate(sequences).astype(np.int64)
    is_target = np.repeat(np.asarray(modes, dtype=bool), lengths)
    return tokens, is_target
