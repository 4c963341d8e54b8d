"""What the planner takes from a training recipe, loaded exactly as ``megalong train`` loads it.

The recipe goes through :func:`megalong.config.load` into a :class:`RunConfig` (so a typo is
an error naming the key, and an unset value is the default training would use); the planner
keeps the model, the sequence length, the global batch, the loss chunking, the data section
(its mixture gives the attention work, megalong.plan.workload), the runtime's communication
overlap, and the recipe's own layout (evaluated and shown beside the best ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megalong.checkpoint.layout import is_weights_dir
from megalong.config import ParallelConfig, load
from megalong.data.config import DataConfig
from megalong.model.config import ModelConfig
from megalong.model.presets import resolve


@dataclass
class RecipeFacts:
    model: ModelConfig
    seq_length: int
    global_batch: int
    loss_chunk_tokens: int
    parallel: ParallelConfig
    micro_batch: int = 1
    recompute: Optional[str] = None
    precision: str = "bf16"
    data: Optional[DataConfig] = None
    overlap_dp_comm: bool = False


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
        micro_batch=run.schedule.micro_batch_size,
        recompute=run.model.recompute,
        precision="fp8" if run.model.fp8 is not None else "bf16",
        data=run.data,
        # The step-time model overlaps the reduce-scatter and the all-gather together; a recipe
        # asking for only one is planned as overlapping neither (the slower estimate).
        overlap_dp_comm=run.runtime.overlap_grad_reduce and run.runtime.overlap_param_gather,
    )
