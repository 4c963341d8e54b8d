"""Skipped-record bookkeeping, line-number resolution and the length histogram.

Every record that does not become a document is counted by reason; the first few of each
reason per shard keep their location (``file:line``, ``file:row``, or the file) so the
report can point at them. In strict mode the first bad one stops the run with its location;
records dropped by a filter the user asked for (length, duplicates) are not bad input and
never stop it. Files left out of a code repository's document are counted the same way,
by reason with the first paths; of those only files and directories that cannot be read
are bad input (the other reasons are the repository policy).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

EXAMPLES_PER_REASON = 10  # per shard; the final report keeps up to 5x that per reason

REASONS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_key": "the text key is absent or null",
    "text_not_string": "the text value is not a string",
    "not_utf8": "the bytes are not valid UTF-8",
    "empty_text": "the text is empty or only whitespace",
    "unreadable_file": "the file could not be read or decompressed",
    "unreadable_directory": "the directory could not be listed: the files in it are missing",
    "too_deeply_nested": "the JSON nests deeper than the parser can follow",
    "too_short": "fewer tokens than min_tokens",
    "too_long": "more tokens than max_tokens",
    "duplicate": "exact duplicate of an earlier document",
    # MDS (mosaicml-streaming) inputs: megalong/data/preprocess/mds_input.py
    "unreadable_index": "an MDS directory without a readable index.json",
    "unreadable_shard": "an MDS shard that is missing, corrupt, cut short or not decompressible (counted per sample lost)",
    "corrupt_sample": "an MDS sample whose bytes do not decode",
    "bad_tokens": "input_ids missing, empty, not integers, or outside the tokenizer's vocabulary",
    "bad_spans": "indices (document spans) that do not tile the sample: outside it, overlapping or leaving a gap",
    "mask_length": "a mask whose length differs from input_ids",
    "length_mismatch": "the length field differs from the number of input_ids",
}
# Dropped by the user's own filters: counted, but never a reason for --strict to stop.
FILTER_REASONS = frozenset({"too_short", "too_long", "duplicate"})

# Why a file of a code repository is left out of the repository's document.
REPO_FILE_REASONS = {
    "binary": "binary (known suffix, a NUL byte, or not UTF-8)",
    "generated": "generated (lock file, minified, protobuf output, a do-not-edit marker)",
    "symlink": "a symbolic link (never followed)",
    "not_regular_file": "not a regular file (named pipe, socket, device)",
    "empty": "empty or only whitespace",
    "too_large": "larger than repo_max_file_bytes",
    "repo_cap": "past the repository cap (repo_max_bytes)",
    "unreadable": "the file could not be read",
    "unreadable_directory": "the directory could not be listed: the files in it are missing",
    "duplicate_path": "a second dataset row with the same path in the repository (the first is kept)",
}
# Input errors, not policy: --strict stops at them.
REPO_FILE_ERRORS = frozenset({"unreadable", "unreadable_directory"})


class BadInputError(ValueError):
    """A bad record in strict mode (or an unusable input); the message starts with its location."""


def _strict_stop(where: str, what: str, detail: str) -> BadInputError:
    return BadInputError(f"{where}: {what}" + (f" ({detail})" if detail else "")
                         + " [--strict stops at the first bad input; without it such input is skipped and counted]")


class SkipLog:
    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self.repo_file_skips: Counter = Counter()
        self.repo_file_examples: list[dict] = []

    def skip(self, reason: str, path: str, detail: str = "", *, line: int | None = None,
             offset: int | None = None, row: int | None = None, sample: int | None = None,
             count: int = 1) -> None:
        """Record ``count`` skipped records; ``offset`` (a byte offset of a line) is turned
        into a line number only when needed (in strict mode now, else when reporting)."""
        if self.strict and reason not in FILTER_REASONS:
            if offset is not None:
                line = line_numbers(path, [offset])[offset]
            where = format_location({"path": path, "line": line, "row": row, "sample": sample})
            raise _strict_stop(where, REASONS.get(reason, reason), detail)
        self.counts[reason] += count
        if self.counts[reason] - count < EXAMPLES_PER_REASON:
            example = {"reason": reason, "path": path, "detail": detail[:200]}
            for key, value in (("line", line), ("offset", offset), ("row", row), ("sample", sample)):
                if value is not None:
                    example[key] = value
            self.examples.append(example)

    def leave_out_repo_file(self, reason: str, path, detail: str = "") -> None:
        """A file (or directory) of a code repository left out of its document."""
        if self.strict and reason in REPO_FILE_ERRORS:
            raise _strict_stop(str(path), REPO_FILE_REASONS[reason], detail)
        self.repo_file_skips[reason] += 1
        if self.repo_file_skips[reason] <= EXAMPLES_PER_REASON:
            self.repo_file_examples.append({"reason": reason, "path": str(path), "detail": detail[:200]})

    def to_dict(self) -> dict:
        return {"skipped": dict(sorted(self.counts.items())), "skip_examples": self.examples,
                "repo_files_skipped": dict(sorted(self.repo_file_skips.items())),
                "repo_file_examples": self.repo_file_examples}


def format_location(example: dict) -> str:
    where = str(example["path"])
    if example.get("line") is not None:
        where += f":{example['line']}"
    elif example.get("row") is not None:
        where += f" row {example['row']}"
    elif example.get("sample") is not None:
        where += f" sample {example['sample']}"
    return where


def line_numbers(path: str, offsets: list[int]) -> dict[int, int]:
    """1-based line numbers of the lines starting at byte ``offsets`` (one pass over the file)."""
    wanted = sorted(set(offsets))
    result: dict[int, int] = {}
    newlines, position, index = 0, 0, 0
    with open(path, "rb") as handle:
        while index < len(wanted):
            block = handle.read(1 << 24)
            if not block:
                break
            end = position + len(block)
            while index < len(wanted) and wanted[index] <= end:
                result[wanted[index]] = newlines + block.count(b"\n", 0, wanted[index] - position) + 1
                index += 1
            newlines += block.count(b"\n")
            position = end
    return result


def resolve_examples(examples: list[dict]) -> list[dict]:
    """Replace byte offsets by line numbers, one pass per file."""
    by_path: dict[str, list[int]] = {}
    for example in examples:
        if "offset" in example:
            by_path.setdefault(example["path"], []).append(example["offset"])
    resolved = {path: line_numbers(path, offsets) for path, offsets in by_path.items()}
    out = []
    for example in examples:
        example = dict(example)
        if "offset" in example:
            example["line"] = resolved[example["path"]].get(example.pop("offset"))
        out.append(example)
    return out


class LengthHistogram:
    """Documents and tokens per power-of-two length bucket [2^k, 2^(k+1))."""

    BUCKETS = 40

    def __init__(self):
        self.documents = np.zeros(self.BUCKETS, dtype=np.int64)
        self.tokens = np.zeros(self.BUCKETS, dtype=np.int64)
        self.min_length: int | None = None
        self.max_length = 0

    def add(self, lengths: np.ndarray) -> None:
        if lengths.size == 0:
            return
        lengths = np.asarray(lengths, dtype=np.int64)
        buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
        self.documents += np.bincount(buckets, minlength=self.BUCKETS)[: self.BUCKETS]
        self.tokens += np.bincount(buckets, weights=lengths, minlength=self.BUCKETS)[: self.BUCKETS].astype(np.int64)
        low, high = int(lengths.min()), int(lengths.max())
        self.min_length = low if self.min_length is None else min(self.min_length, low)
        self.max_length = max(self.max_length, high)

    def to_list(self) -> list[dict]:
        return [{"min_tokens": 1 << k, "max_tokens_exclusive": 1 << (k + 1),
                 "documents": int(self.documents[k]), "tokens": int(self.tokens[k])}
                for k in range(self.BUCKETS) if self.documents[k]]
