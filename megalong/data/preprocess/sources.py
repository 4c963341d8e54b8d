"""Find the input files and cut them into shards: the units of parallel work and of resume.

A shard is a small JSON-able description of a contiguous piece of the input, in a stable
order (inputs as given, files sorted by path), so every process that plans the same inputs
gets the same shards: a resumed run, or each task of a SLURM job array.

* plain JSONL is cut into byte ranges (a range owns the lines that *start* inside it, so
  ranges need no pre-scan of the file);
* compressed JSONL (.gz, .zst) cannot be seeked: one shard per file;
* Parquet is cut at row groups;
* text files and code repositories are grouped whole;
* MDS datasets (mosaicml-streaming) are cut at their shard files (mds_input.py);
* what cannot be read at all (a directory that cannot be listed, a dangling link, a named
  pipe) gets a shard of kind ``unreadable``, so the worker reports it like any bad input:
  counted with its path, or the stop of a ``--strict`` run.
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megalong.data.preprocess.code_repos import list_repo_files
from megalong.data.preprocess.config import PreprocessConfig
from megalong.data.preprocess.files import not_regular_error, walk_files

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = (".gz", ".zst", ".zstd")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """Inputs that cannot be planned (missing path, unknown format); names the path."""


@dataclass
class Shard:
    kind: str  # jsonl-range | jsonl-stream | parquet | text-files | code-repos | mds-<layout> | unreadable
    # jsonl-range: [[path, start, end]]; jsonl-stream: [[path]]; parquet: [[path, row_group]];
    # text-files / code-repos: [[path], ...]; mds-*: [[shard file, dataset dir, number, index entry]];
    # repo-rows-partition: [[parquet file, buckets, repo column, path column, content column]];
    # repo-rows-group: [[bucket, buckets, [partition shard ids]]];
    # unreadable: [[path, skip reason, detail]]
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


def _unreadable(path, reason: str, err: OSError) -> Shard:
    return Shard("unreadable", [[str(path), reason, err.strerror or str(err)]], 0)


def _walk_files(directory: Path, unreadable: list[Shard]) -> list[Path]:
    """Files under ``directory``; each directory that cannot be listed becomes an
    ``unreadable`` shard in ``unreadable``."""
    return walk_files(directory, lambda err: unreadable.append(_unreadable(err.filename, "unreadable_directory", err)))


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
    # entries: ("file", path, size), ("group", kind, [(path, size), ...]) or ("unreadable", shard)
    entries: list[tuple] = []
    if cfg.input_format == "mds":
        return _plan_mds(cfg)
    for pattern in cfg.inputs:
        for path in _expand(pattern):
            fmt = cfg.input_format
            unreadable: list[Shard] = []
            if fmt == "code-repos" and path.is_file() and _is_parquet(path.name):
                entries.append(("repo-rows", path))
                continue
            if fmt in ("text", "code-repos"):
                if not path.is_dir():
                    raise InputError(f"input {path}: input_format {fmt} expects a directory")
                entries.append(("group", *_grouped_units(path, fmt, cfg, unreadable)))
                entries += [("unreadable", shard) for shard in unreadable]
                continue
            files = _walk_files(path, unreadable) if path.is_dir() else [path]
            chosen = [f for f in files if (fmt in ("auto", "jsonl") and _is_jsonl(f.name))
                      or (fmt in ("auto", "parquet") and _is_parquet(f.name))]
            if not chosen and not unreadable:
                raise InputError(
                    f"input {path}: no JSONL (.jsonl/.json[.gz|.zst]) or Parquet files found"
                    + ("; for a directory of text files pass --input-format text, for a directory of "
                       "repositories --input-format code-repos" if path.is_dir() else "")
                )
            entries += [("file", f, _size(f)) for f in chosen]
            entries += [("unreadable", shard) for shard in unreadable]
    row_files = [e[1] for e in entries if e[0] == "repo-rows"]
    if row_files and len(row_files) != len(entries):
        raise InputError("--input-format code-repos takes either repository directories or Parquet files of one "
                         "row per source file, not both in one run")
    total = sum(e[2] if e[0] == "file" else sum(size for _, size in e[2]) if e[0] == "group" else 0
                for e in entries)
    target = int(cfg.shard_size_mb * (1 << 20)) if cfg.shard_size_mb else auto_shard_bytes(total)
    target = max(1, target)
    if row_files:
        from megalong.data.preprocess.repo_rows import plan_repo_rows

        columns = (cfg.repo_key, cfg.repo_path_key, cfg.repo_content_key)
        return [Shard(kind, items, size) for kind, items, size in plan_repo_rows(row_files, target, columns)]
    shards: list[Shard] = []
    for entry in entries:
        if entry[0] == "file":
            shards += _plan_file(entry[1], target)
        elif entry[0] == "group":
            shards += _group(entry[1], entry[2], target)
        else:
            shards.append(entry[1])
    return shards


def _plan_file(path: Path, target: int) -> list[Shard]:
    name = str(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a named pipe would block every reader (and pyarrow here)
            raise not_regular_error(path, info.st_mode)
    except OSError as err:  # a dangling link, a vanished file, a named pipe
        return [_unreadable(path, "unreadable_file", err)]
    size = info.st_size
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


def _grouped_units(directory: Path, fmt: str, cfg: PreprocessConfig, unreadable: list[Shard]) -> tuple[str, list]:
    if fmt == "text":
        suffixes = tuple(cfg.text_suffixes)
        files = _walk_files(directory, unreadable)
        return "text-files", [(f, _size(f)) for f in files if not suffixes or f.name.endswith(suffixes)]
    try:
        repos = [directory] if (directory / ".git").exists() else sorted(p for p in directory.iterdir() if p.is_dir())
    except OSError as err:
        unreadable.append(_unreadable(directory, "unreadable_directory", err))
        repos = []
    # Sizes only (for cutting shards): what cannot be read is reported when the repository is read.
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


def _plan_mds(cfg: PreprocessConfig) -> list[Shard]:
    """MDS dataset directories: whole MDS shards, grouped up to the shard size; a directory
    whose index cannot be read becomes an ``unreadable`` shard (counted, or the stop of a
    strict run). Every directory must hold the same layout (documents or packed samples)."""
    from megalong.data.preprocess.mds_input import plan_mds

    units, layouts, shards = [], {}, []
    for pattern in cfg.inputs:
        for path in _expand(pattern):
            if not path.is_dir():
                raise InputError(f"input {path}: input_format mds expects a dataset directory (with index.json)")
            found, layout, unreadable = plan_mds(path)
            if unreadable:
                shards.append(Shard("unreadable", [list(unreadable)], 0))
            if layout is not None:
                layouts.setdefault(layout, str(path))
            units += found
    if len(layouts) > 1:
        raise InputError("the MDS inputs mix layouts (" + "; ".join(f"{k}: {v}" for k, v in layouts.items())
                         + "): packed samples and documents go to separate outputs")
    if layouts and next(iter(layouts)) != "documents" and (cfg.min_tokens or cfg.max_tokens or cfg.dedup):
        raise InputError("--min-tokens, --max-tokens and --dedup filter documents; packed MDS samples are kept "
                         "exactly as released")
    total = sum(size for _, size, _ in units)
    target = max(1, int(cfg.shard_size_mb * (1 << 20)) if cfg.shard_size_mb else auto_shard_bytes(total))
    current, current_bytes = [], 0
    for kind, size, item in units:
        if current and current_bytes + size > target:
            shards.append(Shard(kind, current, current_bytes))
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        shards.append(Shard(units[-1][0], current, current_bytes))
    return shards
