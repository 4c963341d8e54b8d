"""A Hugging Face model directory on disk: its config and its (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megalong.convert.safetensors_io import TensorEntry, read_header, read_rows, read_tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpointError(ValueError):
    """A Hugging Face directory that is incomplete or inconsistent."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise HFCheckpointError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


class HFCheckpoint:
    """Reads the tensors of a Hugging Face directory one at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HFCheckpointError(f"{self.directory} is not a directory")
        self.config = read_json(self.directory / "config.json")
        generation = self.directory / "generation_config.json"
        self.generation_config = read_json(generation) if generation.is_file() else None
        self._locations: dict[str, tuple[Path, TensorEntry]] = {}
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFCheckpointError(f"{index_path}: no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise HFCheckpointError(
                    f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}"
                )
            headers = {f: read_header(self.directory / f) for f in files}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise HFCheckpointError(f"{index_path} says {name!r} is in {file}, but that shard has no such tensor")
                self._locations[name] = (self.directory / file, headers[file][name])
        elif (self.directory / SINGLE_FILE).is_file():
            path = self.directory / SINGLE_FILE
            self._locations = {name: (path, entry) for name, entry in read_header(path).items()}
        else:
            found = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {', '.join(found)}: only safetensors is supported)" if found else ""
            raise HFCheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} exists{hint}")

    def names(self) -> list[str]:
        return list(self._locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._locations[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._locations[name][1].dtype

    def file_of(self, name: str) -> Path:
        return self._locations[name][0]

    def read(self, name: str) -> torch.Tensor:
        path, entry = self._locations[name]
        return read_tensor(path, entry)

    def read_rows(self, name: str, first_row: int, out: torch.Tensor) -> None:
        """Read rows of ``name`` straight into ``out`` (see :func:`safetensors_io.read_rows`)."""
        path, entry = self._locations[name]
        read_rows(path, entry, first_row, out)

    def total_bytes(self) -> int:
        return sum(entry.nbytes for _, entry in self._locations.values())
