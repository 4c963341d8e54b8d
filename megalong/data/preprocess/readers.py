"""Read the documents of one shard: ``iter_documents(shard, cfg, skips)`` yields
``(text, where)`` pairs, ``where`` being ``(path, "line"|"offset"|"row"|"file", value)``.

Bad records are reported to the SkipLog (which raises in strict mode) and never yielded.
Blank lines of a JSONL file are not records and are passed over silently, and so is a UTF-8
byte-order mark at the start of a file (editors on Windows write one). Files are opened
only if they are regular files (files.open_regular): a named pipe would block forever.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from megalong.data.preprocess.code_repos import repo_document
from megalong.data.preprocess.config import PreprocessConfig
from megalong.data.preprocess.files import open_regular
from megalong.data.preprocess.report import BadInputError, SkipLog
from megalong.data.preprocess.sources import Shard

Where = tuple
BOM = b"\xef\xbb\xbf"


def _check_text(text, skips: SkipLog, path: str, loc: dict) -> str | None:
    if text is None:
        skips.skip("missing_key", path, **loc)
        return None
    if not isinstance(text, str):
        skips.skip("text_not_string", path, f"got {type(text).__name__}", **loc)
        return None
    if not text or text.isspace():
        skips.skip("empty_text", path, **loc)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates from \\ud800-style JSON escapes
        skips.skip("not_utf8", path, str(err), **loc)
        return None
    return text


def _parse_line(raw: bytes, key: str, skips: SkipLog, path: str, loc: dict) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        skips.skip("not_utf8", path, f"byte {err.start} of the line", **loc)
        return None
    try:
        record = json.loads(line)
    except ValueError as err:
        skips.skip("malformed_json", path, str(err), **loc)
        return None
    except RecursionError:  # valid JSON nested deeper than Python's parser recurses
        skips.skip("too_deeply_nested", path, "", **loc)
        return None
    if not isinstance(record, dict):
        skips.skip("not_an_object", path, f"got {type(record).__name__}", **loc)
        return None
    return _check_text(record.get(key), skips, path, loc)


def _jsonl_range(path: str, start: int, end: int, key: str, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    try:
        handle = open_regular(path)
    except OSError as err:
        skips.skip("unreadable_file", path, err.strerror or str(err))
        return
    with handle:
        if start > 0:
            # The line that starts before `start` belongs to the previous range.
            handle.seek(start - 1)
            handle.readline()
        position = handle.tell()
        for raw in handle:
            if position >= end:
                break
            line_start, position = position, position + len(raw)
            if line_start == 0:
                raw = raw.removeprefix(BOM)
            if raw.isspace():
                continue
            text = _parse_line(raw, key, skips, path, {"offset": line_start})
            if text is not None:
                yield text, (path, "offset", line_start)


def _decompressed(path: str, raw):
    """A binary reader of the decompressed bytes of ``raw`` (left open when it is closed)."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False), 1 << 20)


def _jsonl_stream(path: str, key: str, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    try:
        compressed = open_regular(path)
    except OSError as err:
        skips.skip("unreadable_file", path, err.strerror or str(err))
        return
    line_number = 0
    try:
        with compressed, _decompressed(path, compressed) as handle:
            for raw in handle:
                line_number += 1
                if line_number == 1:
                    raw = raw.removeprefix(BOM)
                if raw.isspace():
                    continue
                text = _parse_line(raw, key, skips, path, {"line": line_number})
                if text is not None:
                    yield text, (path, "line", line_number)
    except BadInputError:
        raise
    except Exception as err:  # truncated or corrupt stream (gzip, zstandard.ZstdError), read error
        if not isinstance(err, (OSError, EOFError, ValueError)) and not type(err).__module__.startswith("zstandard"):
            raise
        # The lines read before the damage are kept; the rest of the file is reported.
        skips.skip("unreadable_file", path, f"stream broken after line {line_number}: {err}", line=line_number + 1)


def _parquet(items: list, key: str, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    import pyarrow.parquet as pq

    for path, group in items:
        try:
            parquet = pq.ParquetFile(path)
            rows_before = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            num_rows = parquet.metadata.row_group(group).num_rows
        except Exception as err:  # pyarrow raises several types for an unreadable file
            skips.skip("unreadable_file", path, str(err))
            continue
        if key not in parquet.schema_arrow.names:
            skips.skip("missing_key", path, f"no column {key!r} (columns: {', '.join(parquet.schema_arrow.names)})",
                       row=rows_before, count=num_rows)
            continue
        try:
            column = parquet.read_row_group(group, columns=[key]).column(0).to_pylist()
        except Exception as err:
            skips.skip("unreadable_file", path, f"row group {group}: {err}", row=rows_before, count=num_rows)
            continue
        for index, value in enumerate(column):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as err:
                    skips.skip("not_utf8", path, f"byte {err.start}", row=rows_before + index)
                    continue
            text = _check_text(value, skips, path, {"row": rows_before + index})
            if text is not None:
                yield text, (path, "row", rows_before + index)


def _text_files(items: list, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    for (path,) in items:
        try:
            with open_regular(path) as handle:
                data = handle.read()
        except OSError as err:
            skips.skip("unreadable_file", path, err.strerror or str(err))
            continue
        try:
            text = data.removeprefix(BOM).decode("utf-8")
        except UnicodeDecodeError as err:
            skips.skip("not_utf8", path, f"byte {err.start}")
            continue
        if not text.strip():
            skips.skip("empty_text", path)
            continue
        yield text, (path, "file", None)


def _code_repos(items: list, cfg: PreprocessConfig, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    for (path,) in items:
        text = repo_document(Path(path), cfg.repo_max_file_bytes, cfg.repo_max_bytes, skips.leave_out_repo_file)
        if not text:
            skips.skip("empty_text", path, "no usable source file in the repository")
            continue
        yield text, (path, "file", None)


def iter_documents(shard: Shard, cfg: PreprocessConfig, skips: SkipLog) -> Iterator[tuple[str, Where]]:
    if shard.kind == "jsonl-range":
        for path, start, end in shard.items:
            yield from _jsonl_range(path, start, end, cfg.text_key, skips)
    elif shard.kind == "jsonl-stream":
        for (path,) in shard.items:
            yield from _jsonl_stream(path, cfg.text_key, skips)
    elif shard.kind == "parquet":
        yield from _parquet(shard.items, cfg.text_key, skips)
    elif shard.kind == "text-files":
        yield from _text_files(shard.items, skips)
    elif shard.kind == "code-repos":
        yield from _code_repos(shard.items, cfg, skips)
    elif shard.kind == "unreadable":  # found unreadable while planning
        for path, reason, detail in shard.items:
            skips.skip(reason, path, detail)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
