"""``PreprocessConfig``: every setting of one preprocessing run, loadable from YAML."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

INPUT_FORMATS = ("auto", "jsonl", "parquet", "text", "code-repos", "mds")


@dataclass
class PreprocessConfig:
    # Files, directories or glob patterns. JSONL (.jsonl/.json, plain, .gz or .zst) and Parquet
    # are recognised by name; directories of text files, of repositories or MDS datasets
    # (mosaicml-streaming, each directory with its index.json) need input_format.
    inputs: list[str] = field(default_factory=list)
    input_format: str = "auto"
    # JSON key / Parquet column holding the document text.
    text_key: str = "text"
    # Output: <output_prefix>.bin, .idx and .json; work files under <output_prefix>.work/.
    output_prefix: str = ""
    # A tokenizer spec for megalong.data.tokenizer.load_tokenizer ("llama3", a file or a directory).
    tokenizer: str = "llama3"
    # BOS/EOS policy. Default: <|begin_of_text|> text <|end_of_text|>, the way Llama-3 was
    # pre-trained; Megatron-LM's --append-eod is add_bos=False, add_eos=True. MDS documents
    # (already tokenized) get the same; packed MDS samples are stored as released (no policy).
    add_bos: bool = True
    add_eos: bool = True
    # Keep documents whose stored length (BOS/EOS included) is within [min_tokens, max_tokens];
    # 0 means no limit. ProLong's long domains keep >= 65,536 or >= 524,288 tokens.
    min_tokens: int = 0
    max_tokens: int = 0
    # Drop exact duplicates (identical text); the first occurrence in input order is kept.
    dedup: bool = False
    # Stop at the first bad input (naming file:line, or the file) instead of skipping and counting
    # it; documents dropped by the length or dedup filters never stop a run.
    strict: bool = False
    # Worker processes (0 = all CPUs this process may use).
    workers: int = 0
    # Input MB per shard: the unit of parallel work and of resume. 0 = automatic: about 64
    # shards over the whole input, each 1-64 MiB (depends on the inputs only).
    shard_size_mb: float = 0.0
    # For input_format text: file name suffixes to read (empty = every file).
    text_suffixes: list[str] = field(default_factory=list)
    # For input_format code-repos: files larger than this are left out of their repository
    # document; a repository document stops growing at repo_max_bytes (0 = no cap).
    repo_max_file_bytes: int = 1_000_000
    repo_max_bytes: int = 0
    # For input_format code-repos given Parquet files with one row per source file (The Stack
    # v1): the columns of the repository name, the file's path in it and its text.
    repo_key: str = "max_stars_repo_name"
    repo_path_key: str = "max_stars_repo_path"
    repo_content_key: str = "content"
    # Keep <output_prefix>.work/ after a successful merge (for inspection).
    keep_work: bool = False
    # Replace a dataset already at output_prefix that this run did not make (without it, an
    # existing output is refused: an unrelated file, or a dataset built from other inputs).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format {self.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
        if self.min_tokens < 0 or self.max_tokens < 0:
            raise ValueError("min_tokens and max_tokens must be >= 0 (0 = no limit)")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is larger than max_tokens {self.max_tokens}")
        if self.shard_size_mb < 0:
            raise ValueError("shard_size_mb must be >= 0 (0 = automatic)")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = all CPUs)")

    @property
    def num_workers(self) -> int:
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)

    @property
    def work_dir(self) -> str:
        return f"{self.output_prefix}.work"

    def plan_settings(self) -> dict:
        """The settings a shard's contents depend on (a resumed run must match them)."""
        return {
            "inputs": list(self.inputs),
            "input_format": self.input_format,
            "text_key": self.text_key,
            "tokenizer": self.tokenizer,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "dedup": self.dedup,
            "shard_size_mb": self.shard_size_mb,
            "text_suffixes": list(self.text_suffixes),
            "repo_max_file_bytes": self.repo_max_file_bytes,
            "repo_max_bytes": self.repo_max_bytes,
            "repo_key": self.repo_key,
            "repo_path_key": self.repo_path_key,
            "repo_content_key": self.repo_content_key,
        }
