"""Accelerator specifications the step-time and memory estimates use.

Numbers are NVIDIA's published datasheet figures for the SXM parts, dense (no 2:4
sparsity). ``nvlink_gbps`` is the per-direction NVLink bandwidth of one GPU (half the
"bidirectional" datasheet number); ``network_gbps`` is the per-GPU inter-node bandwidth of
a typical cluster of that generation (one InfiniBand NIC per GPU). Both are in GB/s.
Sources: A100 (SXM4 80GB), H100 (SXM5), H200 (SXM) and HGX B200 datasheets. What share of
these peaks real kernels reach is calibrated separately (megalong.plan.efficiency).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal, Optional


# Which calibration constants a GPU uses (megalong.plan.efficiency): kernels reach different
# shares of peak on different tensor-core generations.
Generation = Literal["ampere", "hopper", "blackwell"]


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float  # HBM capacity in GB (10^9 bytes), as sold
    bf16_tflops: float  # dense peak
    fp8_tflops: Optional[float]  # None: no FP8 tensor cores
    hbm_tbps: float
    nvlink_gbps: float  # per direction, per GPU
    network_gbps: float  # per GPU, between nodes
    generation: Generation = "hopper"
    # Fraction of the link bandwidth NCCL collectives reach ("bus bandwidth").
    link_efficiency: float = 0.8
    # CUDA context, cuBLAS/NCCL workspaces and communicator buffers, per process.
    framework_overhead_gb: float = 3.0
    # Caching-allocator fragmentation: a share of everything else that is reserved but unusable.
    fragmentation: float = 0.05

    def with_memory(self, memory_gb: float) -> "GpuSpec":
        return replace(self, memory_gb=memory_gb)

    @classmethod
    def of_memory(cls, name: str, memory_gb: float) -> "GpuSpec":
        """A GPU known only by its memory (the one a process runs on), for memory checks:
        no speed figures, the default framework overhead and fragmentation."""
        return cls(name, memory_gb, bf16_tflops=0.0, fp8_tflops=None, hbm_tbps=0.0, nvlink_gbps=0.0,
                   network_gbps=0.0)


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", 80, 312, None, 2.0, 300, 25, generation="ampere"),
    "h100": GpuSpec("h100", 80, 989, 1979, 3.35, 450, 50, generation="hopper"),
    "h200": GpuSpec("h200", 141, 989, 1979, 4.8, 450, 50, generation="hopper"),
    "b200": GpuSpec("b200", 180, 2250, 4500, 8.0, 900, 50, generation="blackwell"),
}


class UnknownGpuError(ValueError):
    pass


def gpu_spec(name: str, memory_gb: float | None = None) -> GpuSpec:
    """The spec of ``name`` (a100, h100, h200, b200), optionally with another memory size."""
    key = name.strip().lower()
    if key not in GPUS:
        raise UnknownGpuError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    spec = GPUS[key]
    return spec.with_memory(memory_gb) if memory_gb is not None else spec


def parse_memory(text: str) -> float:
    """``"80GB"``, ``"141 GB"``, ``"80"`` -> 80.0 (GB); ``"96GiB"`` -> 103.08 (GB)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(gib|gb|g)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (write e.g. 80GB or 96GiB)")
    value = float(match.group(1))
    return value * 1.073741824 if match.group(2) == "gib" else value
