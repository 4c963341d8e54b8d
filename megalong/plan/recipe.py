"""What the planner takes from a training recipe, loaded exactly as ``megalong train`` loads it.

The recipe goes through :func:`megalong.config.load` into a :class:`RunConfig` (so a typo is
an error naming the key, and an unset value is the default training would use); the planner
keeps the model, the sequence length, the global batch, the loss chunking and the current
layout (shown for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megalong.checkpoint.layout import is_weights_dir
from megalong.config import ParallelConfig, load
from megalong.model.config import ModelConfig
from megalong.model.presets import resolve


@dataclass
class RecipeFacts:
    model: ModelConfig
    seq_length: int
    global_batch: int
    loss_chunk_tokens: int
    parallel: ParallelConfig


def read_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> RecipeFacts:
    from megalong.training.config import RunConfig

    run = load(RunConfig, path, overrides)
    # A later stage's initial weights may not exist yet when it is planned: then the recipe's
    # own model (and preset) must say the shape.
    model = run.resolved_model() if run.init.weights and is_weights_dir(run.init.weights) else resolve(run.model)
    return RecipeFacts(
        model=model,
        seq_length=run.data.seq_length,
        global_batch=run.schedule.global_batch_size,
        loss_chunk_tokens=run.loss.chunk_tokens,
        parallel=run.parallel,
    )
