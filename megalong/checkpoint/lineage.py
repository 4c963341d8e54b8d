"""Which stages made a checkpoint's weights: the record training keeps, and what reads it.

Every training checkpoint lists, in ``train_state.json`` under ``"stages"``, the runs its
weights went through, oldest first, the run that saved it last. A run started from
``init.weights`` copies that directory's list and adds itself; a converted Hugging Face
model (a weights directory without ``train_state.json``) is described by one entry naming
the directory. Each entry says what a model card needs: the run's name, its initial weights,
steps and tokens trained, sequence length, RoPE theta and scaling, and its data (mixture,
domains and shares; the chat format for SFT data). ``megalong convert megatron-to-hf`` writes
it into the release's README and takes the chat template from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from megalong.checkpoint.layout import TRAIN_STATE_FILE, is_training_checkpoint, read_model_config


def rope_record(model) -> dict:
    """RoPE of a resolved model config as plain values (scaling: a mapping, or None for none)."""
    return {"rope_theta": float(model.rope_theta),
            "rope_scaling": asdict(model.rope_scaling) if model.rope_scaling else None}


def stage_record(run, model, steps: int, tokens: int, data: Optional[dict]) -> dict:
    """The entry of the run ``run`` (a RunConfig) after ``steps`` steps; ``data``: its stream's
    summary (:meth:`megalong.data.stream.TrainStream.summary`), None for a custom stream."""
    return {
        "name": run.name, "init": run.init.weights, "steps": int(steps), "planned_steps": run.schedule.train_steps,
        "tokens": int(tokens), "seq_length": run.data.seq_length,
        "max_position_embeddings": model.max_position_embeddings, **rope_record(model),
        "data": data if data is not None else {"data_factory": run.data_factory},
    }


def stages_of(directory: str | Path) -> list[dict]:
    """The stages that made the weights in ``directory`` (a resolved weights or checkpoint
    directory), oldest first. A directory without a record (converted weights, or a checkpoint
    of an earlier megalong) is one entry naming it."""
    directory = Path(directory)
    if is_training_checkpoint(directory):
        recorded = json.loads((directory / TRAIN_STATE_FILE).read_text(encoding="utf-8")).get("stages")
        if recorded:
            return list(recorded)
    model = read_model_config(directory)
    what = ("a training checkpoint of an earlier megalong (no record of its stages)"
            if is_training_checkpoint(directory) else "weights directory")
    return [{"name": None, "weights": str(directory), "what": what,
             "max_position_embeddings": model.max_position_embeddings, **rope_record(model)}]


def chat_format(stages: list[dict]) -> Optional[dict]:
    """``{"chat_format", "end_of_turn_id"}`` of the latest stage that trained on chat data, or
    None when no stage did. Two chat formats in one stage: an error naming them."""
    for stage in reversed(stages):
        chats = (stage.get("data") or {}).get("chat") or []
        if len({c.get("chat_format") for c in chats}) > 1:
            raise ValueError(f"stage {stage.get('name')!r} trained on chat data in several formats "
                             f"({', '.join(sorted(str(c.get('chat_format')) for c in chats))}): no single chat template")
        if chats:
            return chats[0]
    return None
