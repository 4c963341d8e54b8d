"""Model weights on disk: save and load a weights directory (see :mod:`megalong.checkpoint.layout`).

The weights are a Megatron-Core distributed checkpoint of the model's sharded state dict
(torch_dist backend), which loads at any TP/PP/CP/DP layout. Directories appear
atomically: everything is written under the staging name and renamed into place, so a
killed writer never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megalong.checkpoint.layout import MODEL_SUBDIR, resolve, staging_dir, write_model_config
from megalong.model.config import ModelConfig


def sharded_model_state(model_chunks: list) -> dict:
    """The sharded state dict of this rank's chunks, keyed as Megatron-Core keys them.

    The keys on disk are the ShardedTensor keys, which carry global layer numbers, so a
    checkpoint saved at one layout loads at any other. The in-memory nesting (one entry
    per virtual pipeline chunk) only routes the loaded tensors back to their modules.
    """
    if len(model_chunks) == 1:
        return model_chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_weights(model_chunks: list, directory: str | Path, model: ModelConfig) -> Path:
    """Save this job's model weights to ``directory`` (collective: call on every rank)."""
    from megatron.core import dist_checkpointing

    final = Path(directory)
    if final.exists():
        raise FileExistsError(f"refusing to overwrite existing checkpoint {final}")
    tmp = staging_dir(final)
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / MODEL_SUBDIR).mkdir(parents=True)
        write_model_config(tmp, model)
    _barrier()
    dist_checkpointing.save(sharded_model_state(model_chunks), str(tmp / MODEL_SUBDIR))
    _barrier()
    if _is_rank0():
        os.replace(tmp, final)
    _barrier()
    return final


def load_weights(model_chunks: list, directory: str | Path, strict: bool = True) -> None:
    """Load weights saved at any parallel layout into this rank's chunks (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = resolve(directory) / MODEL_SUBDIR
    sharded = sharded_model_state(model_chunks)
    state = dist_checkpointing.load(
        sharded, str(path),
        strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL,
    )
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(state)
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(state[f"model{i}"])
