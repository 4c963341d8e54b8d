"""Parallel layout: how the world of processes is split into TP x CP x PP x DP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalong.config.loader import ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot work; raised before any process group exists."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Virtual pipeline stages per pipeline rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pipeline: Optional[int] = None
    context_parallel: int = 1
    # Sequence parallelism splits norms/dropout activations over TP ranks (needs TP > 1).
    sequence_parallel: bool = False
    # Megatron-Core's distributed optimizer shards optimizer state over DP ranks.
    distributed_optimizer: bool = True

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def validate(self, world_size: int) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 1:
                raise LayoutError(f"parallel.virtual_pipeline must be >= 1, got {self.virtual_pipeline}")
            if self.pipeline_parallel < 2 and self.virtual_pipeline > 1:
                raise LayoutError(
                    f"parallel.virtual_pipeline={self.virtual_pipeline} needs pipeline_parallel > 1, "
                    f"got pipeline_parallel={self.pipeline_parallel}"
                )
        if world_size % self.model_parallel_size != 0:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP x CP x PP = "
                f"{self.tensor_parallel} x {self.context_parallel} x {self.pipeline_parallel} = "
                f"{self.model_parallel_size}"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise LayoutError("parallel.sequence_parallel=true needs tensor_parallel > 1")

    def describe(self, world_size: int) -> str:
        dp = self.data_parallel_size(world_size)
        vp = f" (x{self.virtual_pipeline} virtual)" if self.virtual_pipeline else ""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        return (
            f"TP={self.tensor_parallel}{sp} PP={self.pipeline_parallel}{vp} CP={self.context_parallel} "
            f"DP={dp} over {world_size} processes"
        )
