"""Check a recipe's parallel layout against the job's nodes x processes before submitting.

A layout that cannot work must be refused on the login node with the numbers in the
message, not discovered after hours in the queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megalong.config import ConfigError, LayoutError, ParallelConfig, apply_overrides, from_dict
from megalong.config.loader import load_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobShape:
    """How many processes a job has: ``nodes`` x ``procs_per_node`` (one per GPU on GPUs)."""

    nodes: int
    procs_per_node: int
    gpus_per_node: int  # 0 = a CPU job

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        unit = "GPUs" if self.gpus_per_node else "CPU processes"
        node = "node" if self.nodes == 1 else "nodes"
        return f"{self.nodes} {node} x {self.procs_per_node} {unit} per node = {self.world_size} processes"


def recipe_data(recipe: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The recipe's YAML as a dict with ``key.sub=value`` overrides applied."""
    return apply_overrides(load_yaml(recipe), overrides)


def check_recipe_layout(recipe: str | Path, shape: JobShape, overrides: Iterable[str] = ()) -> str:
    """Return a one-line description of the layout, or raise LayoutError naming the numbers.

    Reads only the recipe's ``parallel:`` section (and ``schedule:`` batch sizes when
    present), so it works before the rest of the configuration is importable.
    """
    if shape.nodes < 1 or shape.procs_per_node < 1:
        raise LayoutError(f"a job needs at least 1 node and 1 process per node, got {shape.describe()}")
    data = recipe_data(recipe, overrides)
    section = data.get("parallel") or {}
    try:
        parallel = from_dict(ParallelConfig, section, source=f"{recipe}: parallel")
    except ConfigError as err:
        raise LayoutError(str(err)) from None
    try:
        parallel.validate(shape.world_size)
    except LayoutError as err:
        raise LayoutError(f"{recipe}: the job's {shape.describe()} do not fit the recipe: {err}") from None
    dp = parallel.data_parallel_size(shape.world_size)

    schedule = data.get("schedule") or {}
    global_batch, micro_batch = schedule.get("global_batch_size"), schedule.get("micro_batch_size", 1)
    if isinstance(global_batch, int) and isinstance(micro_batch, int) and micro_batch > 0:
        if global_batch % (dp * micro_batch) != 0:
            raise LayoutError(
                f"{recipe}: schedule.global_batch_size={global_batch} is not divisible by "
                f"data-parallel size x micro_batch_size = {dp} x {micro_batch} = {dp * micro_batch} "
                f"(DP={dp} from {shape.describe()} and TP x CP x PP = {parallel.model_parallel_size})"
            )
    if shape.gpus_per_node and parallel.tensor_parallel > shape.gpus_per_node:
        log.warning(
            "%s: tensor_parallel=%d spans more than one node (%d GPUs per node): expect it to be slow",
            recipe, parallel.tensor_parallel, shape.gpus_per_node,
        )
    return parallel.describe(shape.world_size)
