"""Check a recipe's parallel layout against the job's nodes x processes before submitting.

A layout that cannot work must be refused on the login node with the numbers in the
message, not discovered after hours in the queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megalong.config import ConfigError, LayoutError, load

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


def check_recipe_layout(recipe: str | Path, shape: JobShape, overrides: Iterable[str] = ()) -> str:
    """Load ``recipe`` (with ``overrides``) and :func:`check_run` it; the layout's description."""
    from megalong.training.config import RunConfig

    return check_run(load(RunConfig, recipe, overrides), recipe, shape)


def check_run(run, recipe: str | Path, shape: JobShape, check_data: bool = True, check_init: bool = True) -> str:
    """Validate a loaded recipe for a job of ``shape`` exactly as ``megalong train`` will
    (:meth:`RunConfig.validate`); return a one-line description of the layout.

    ``check_data`` / ``check_init``: also require the mixture's datasets / the initial weights
    to exist now (not when an earlier job of the chain produces them). Raises ConfigError or
    LayoutError naming the recipe, the keys and the numbers.
    """
    if shape.nodes < 1 or shape.procs_per_node < 1:
        raise LayoutError(f"a job needs at least 1 node and 1 process per node, got {shape.describe()}")
    try:
        run.validate(shape.world_size, check_data=check_data, check_init=check_init)
    except LayoutError as err:
        raise LayoutError(f"{recipe}: the job's {shape.describe()} do not fit the recipe: {err}") from None
    except (ConfigError, FileNotFoundError) as err:
        raise ConfigError(f"{recipe}: {err} (with {shape.describe()})") from None
    parallel = run.parallel
    if shape.gpus_per_node and parallel.tensor_parallel > shape.gpus_per_node:
        log.warning(
            "%s: tensor_parallel=%d spans more than one node (%d GPUs per node): expect it to be slow",
            recipe, parallel.tensor_parallel, shape.gpus_per_node,
        )
    return parallel.describe(shape.world_size)
