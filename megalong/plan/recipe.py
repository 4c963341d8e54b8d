"""Read what the planner needs from a training recipe, leniently.

The planner only needs the model, the sequence length and the global batch, so it reads
those keys from the YAML and ignores everything else (the full ``RunConfig`` of
``megalong train`` is not required). Keys read, first found wins:

* ``model`` (a :class:`megalong.model.ModelConfig` mapping; presets are resolved)
* sequence length: ``data.seq_length``, ``training.seq_length``, ``seq_length``
* global batch (sequences per step): ``schedule.global_batch_size``,
  ``training.global_batch_size``, ``data.global_batch_size``, ``global_batch_size``
* chunked cross entropy: ``loss.chunk_tokens``, ``training.loss_chunk_tokens``
* current layout (shown for comparison): ``parallel`` (a ParallelConfig mapping)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megalong.config import ConfigError, ParallelConfig, from_dict
from megalong.config.loader import apply_overrides, load_yaml
from megalong.model.config import ModelConfig
from megalong.model.presets import resolve

SEQ_LENGTH_KEYS = ("data.seq_length", "training.seq_length", "seq_length")
GLOBAL_BATCH_KEYS = ("schedule.global_batch_size", "training.global_batch_size", "data.global_batch_size",
                     "global_batch_size")
LOSS_CHUNK_KEYS = ("loss.chunk_tokens", "training.loss_chunk_tokens")


@dataclass
class RecipeFacts:
    model: ModelConfig
    seq_length: Optional[int]
    global_batch: Optional[int]
    loss_chunk_tokens: Optional[int]
    parallel: Optional[ParallelConfig]


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first_int(data: dict, keys: tuple[str, ...], source: str) -> Optional[int]:
    for key in keys:
        value = _lookup(data, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{source}: {key} must be a non-negative integer, got {value!r}")
        return value
    return None


def read_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> RecipeFacts:
    source = str(path)
    data = apply_overrides(load_yaml(path), overrides)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{source}: the recipe has no 'model:' section")
    model = resolve(from_dict(ModelConfig, data["model"], f"{source} (model)"))
    parallel = None
    if isinstance(data.get("parallel"), dict):
        parallel = from_dict(ParallelConfig, data["parallel"], f"{source} (parallel)")
    return RecipeFacts(
        model=model,
        seq_length=_first_int(data, SEQ_LENGTH_KEYS, source),
        global_batch=_first_int(data, GLOBAL_BATCH_KEYS, source),
        loss_chunk_tokens=_first_int(data, LOSS_CHUNK_KEYS, source),
        parallel=parallel,
    )
