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

from megalong import compat
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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model it is loaded into."""


# Transformer Engine's modules (and Megatron-Core's linears) keep per-module state such as FP8
# scaling history under this name; the local layers have none, or None. A checkpoint written
# with one backend loads into the other without it (TE rebuilds it), as Megatron-Core's own
# cross-spec loading tolerates; every other mismatch is an error.
EXTRA_STATE_SUFFIX = "_extra_state"


def _refuse_mismatch(keys, what: str, path) -> None:
    real = sorted(k for k in keys if not k.endswith(EXTRA_STATE_SUFFIX))
    if real:
        shown = ", ".join(real[:8]) + (f" and {len(real) - 8} more" if len(real) > 8 else "")
        raise CheckpointMismatchError(f"{path}: {what}: {shown}")


def refuse_unreadable(path: str | Path) -> None:
    """Refuse, naming it, a distributed checkpoint this Megatron-Core cannot read (one written by
    a newer release: :func:`megalong.compat.checkpoint_format_problem`)."""
    problem = compat.checkpoint_format_problem(path)
    if problem:
        raise CheckpointMismatchError(problem)


def load_model_state(model_chunks: list, path: str | Path) -> None:
    """Load a Megatron-Core distributed checkpoint of the model (``<checkpoint>/model``) into
    this rank's chunks, at any parallel layout and across backends (collective).

    Only ``_extra_state`` entries may be missing on either side; any other key the model wants
    and the checkpoint lacks, or the checkpoint has and the model lacks, is an error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    refuse_unreadable(path)
    sharded = sharded_model_state(model_chunks)
    # Megatron-Core's names: "missing" are in the checkpoint but not asked for, "unexpected"
    # are asked for but not in the checkpoint.
    state, in_checkpoint_only, in_model_only = dist_checkpointing.load(
        sharded, str(path), strict=StrictHandling.RETURN_ALL)
    _refuse_mismatch(in_model_only, "the model has tensors the checkpoint lacks", path)
    _refuse_mismatch(in_checkpoint_only, "the checkpoint has tensors the model has no place for", path)
    states = [state] if len(model_chunks) == 1 else [state[f"model{i}"] for i in range(len(model_chunks))]
    for chunk, chunk_state in zip(model_chunks, states):
        result = chunk.load_state_dict(chunk_state, strict=False)
        _refuse_mismatch(result.missing_keys, "not loaded", path)
        _refuse_mismatch(result.unexpected_keys, "loaded but not used", path)


def load_weights(model_chunks: list, directory: str | Path) -> None:
    """Load the weights of the checkpoint ``directory`` means (:func:`megalong.checkpoint.layout.resolve`),
    saved at any parallel layout and with either backend, into this rank's chunks (collective)."""
    load_model_state(model_chunks, resolve(directory) / MODEL_SUBDIR)
