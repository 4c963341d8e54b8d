"""Find the input files and cut them into shards: the units of parallel work and of resume.

A shard is a small JSON-able description of a contiguous piece of the input, in a stable
order (inputs as given, files sorted by path), so every process that plans the same inputs
gets the same shards: a resumed run, or each task of a SLURM job array.

* plain JSONL is cut into byte ranges (a range owns the lines that *start* inside it, so
  ranges need no pre-scan of the file);
* compressed JSONL (.gz, .zst) cannot be seeked: one shard per file;
* Parquet is cut at row groups;
* text files and code repositories are grouped whole.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megalong.data.preprocess.code_repos import list_repo_files
from megalong.data.preprocess.config import PreprocessConfig

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = (".gz", ".zst", ".zstd")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """Inputs that cannot be planned (missing path, unknown format); names the path."""


@dataclass
class Shard:
    kind: str  # jsonl-range | jsonl-stream | parquet | text-files | code-repos
    # jsonl-range: [[path, start, end]]; jsonl-stream: [[path]]; parquet: [[path, row_group]];
    # text-files / code-repos: [[path], ...]
    items: list = field(default_factory=list)
    input_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Shard":
        return cls(**data)


def _is_jsonl(name: str) -> bool:
    for comp in ("",) + COMPRESSIONS:
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return True
    return False


def _is_parquet(name: str) -> bool:
    return name.endswith(PARQUET_SUFFIXES)


def _expand(pattern: str) -> list[Path]:
    if any(ch in pattern for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise InputError(f"input {pattern!r}: the pattern matches no file")
        return [Path(m) for m in matches]
    path = Path(os.path.expanduser(pattern))
    if not path.exists():
        raise InputError(f"input {pattern!r}: no such file or directory")
    return [path]


def _walk_files(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names))
    return sorted(files, key=lambda p: str(p))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # unreadable files are reported by the reader, with their path


def auto_shard_bytes(total_bytes: int) -> int:
    """About 64 shards for the whole input (so every worker and array task has several),
    each between 1 MiB and 64 MiB. It depends on the inputs only, so every run and every
    array task plans the same shards whatever its worker count."""
    return int(min(64 << 20, max(1 << 20, total_bytes // 64)))


def plan_shards(cfg: PreprocessConfig) -> list[Shard]:
    if not cfg.inputs:
        raise InputError("no inputs given")
    # First find every unit of input and its size, then cut shards of the chosen size.
    entries: list[tuple] = []  # ("file", path, size) or (kind, [(path, size), ...])
    for pattern in cfg.inputs:
        for path in _expand(pattern):
            fmt = cfg.input_format
            if fmt in ("text", "code-repos"):
                if not path.is_dir():
                    raise InputError(f"input {path}: input_format {fmt} expects a directory")
                entries.append(_grouped_units(path, fmt, cfg))
                continue
            files = _walk_files(path) if path.is_dir() else [path]
            chosen = [f for f in files if (fmt in ("auto", "jsonl") and _is_jsonl(f.name))
                      or (fmt in ("auto", "parquet") and _is_parquet(f.name))]
            if not chosen:
                raise InputError(
                    f"input {path}: no JSONL (.jsonl/.json[.gz|.zst]) or Parquet files found"
                    + ("; for a directory of text files pass --input-format text, for a directory of "
                       "repositories --input-format code-repos" if path.is_dir() else "")
                )
            entries += [("file", f, _size(f)) for f in chosen]
    total = sum(e[2] if e[0] == "file" else sum(size for _, size in e[1]) for e in entries)
    target = int(cfg.shard_size_mb * (1 << 20)) if cfg.shard_size_mb else auto_shard_bytes(total)
    target = max(1, target)
    shards: list[Shard] = []
    for entry in entries:
        if entry[0] == "file":
            shards += _plan_file(entry[1], target)
        else:
            shards += _group(entry[0], entry[1], target)
    return shards


def _plan_file(path: Path, target: int) -> list[Shard]:
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError:
        # A dangling link or vanished file: one shard whose reader reports it as unreadable.
        if path.name.endswith(COMPRESSIONS):
            return [Shard("jsonl-stream", [[name]], 0)]
        return [Shard("jsonl-range", [[name, 0, 1]], 0)]
    if _is_parquet(path.name):
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as err:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable Parquet file ({err})") from None
        shards, current, current_bytes = [], [], 0
        for group in range(meta.num_row_groups):
            group_bytes = meta.row_group(group).total_byte_size
            if current and current_bytes + group_bytes > target:
                shards.append(Shard("parquet", current, current_bytes))
                current, current_bytes = [], 0
            current.append([name, group])
            current_bytes += group_bytes
        if current:
            shards.append(Shard("parquet", current, current_bytes))
        return shards
    if path.name.endswith(COMPRESSIONS):
        return [Shard("jsonl-stream", [[name]], size)]
    if size == 0:
        return []
    return [Shard("jsonl-range", [[name, start, min(start + target, size)]], min(target, size - start))
            for start in range(0, size, target)]


def _grouped_units(directory: Path, fmt: str, cfg: PreprocessConfig) -> tuple[str, list]:
    if fmt == "text":
        suffixes = tuple(cfg.text_suffixes)
        return "text-files", [(f, _size(f)) for f in _walk_files(directory) if not suffixes or f.name.endswith(suffixes)]
    repos = [directory] if (directory / ".git").exists() else sorted(p for p in directory.iterdir() if p.is_dir())
    return "code-repos", [(r, sum(_size(f) for f in list_repo_files(r))) for r in repos]


def _group(kind: str, units: list, target: int) -> list[Shard]:
    shards, current, current_bytes = [], [], 0
    for path, size in units:
        if current and current_bytes + size > target:
            shards.append(Shard(kind, current, current_bytes))
            current, current_bytes = [], 0
        current.append([str(path)])
        current_bytes += size
    if current:
        shards.append(Shard(kind, current, current_bytes))
    return shards
