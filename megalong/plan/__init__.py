"""Choose a parallel layout before submitting: memory and step-time estimates.

Public surface (see docs/plan.md):
  ``estimate`` / ``TrainingShape`` / ``MemoryEstimate``  per-GPU memory, broken down
  ``plan`` / ``PlanRequest`` / ``PlanResult``             every layout, ranked, with reasons
  ``check_fits``                                           one layout: fits or not, with a message
  ``gpu_spec``                                             a100 / h100 / h200 / b200 figures
"""

from megalong.plan.hardware import GPUS, GpuSpec, gpu_spec, parse_memory
from megalong.plan.memory import (
    BF16, CPU_LOCAL, FP8, FP32, GPU_TE, KernelProfile, MemoryEstimate, Precision, TrainingShape, estimate,
)
from megalong.plan.planner import Candidate, FitCheck, Layout, PlanRequest, PlanResult, Rejection, check_fits, plan

__all__ = [
    "BF16", "CPU_LOCAL", "Candidate", "FP32", "FP8", "FitCheck", "GPUS", "GPU_TE", "GpuSpec", "KernelProfile",
    "Layout", "MemoryEstimate", "PlanRequest", "PlanResult", "Precision", "Rejection", "TrainingShape",
    "check_fits", "estimate", "gpu_spec", "parse_memory", "plan",
]
