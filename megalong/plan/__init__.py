"""Choose a parallel layout before submitting: memory and step-time estimates.

Public surface (see docs/plan.md):
  ``estimate`` / ``TrainingShape`` / ``MemoryEstimate``  per-GPU memory, broken down
  ``plan`` / ``PlanRequest`` / ``PlanResult``             every layout, ranked, with reasons
  ``family_outcomes`` / ``closest_to_fitting``             the rejections summarised (``summary``)
  ``check_fits``                                           one layout: fits or not, with a message
  ``gpu_spec``                                             a100 / h100 / h200 / b200 figures
"""

from megalong.plan.hardware import GPUS, GpuSpec, gpu_spec, parse_memory
from megalong.plan.memory import (
    BF16, CPU_LOCAL, FP8, FP32, GPU_TE, KernelProfile, MemoryEstimate, Precision, TrainingShape, estimate,
)
from megalong.plan.planner import (
    Candidate, FitCheck, Layout, PlanRequest, PlanResult, Rejection, RejectionKind, check_fits, plan,
)
from megalong.plan.summary import FamilyOutcome, closest_to_fitting, family_outcomes, not_shown

__all__ = [
    "BF16", "CPU_LOCAL", "Candidate", "FP32", "FP8", "FamilyOutcome", "FitCheck", "GPUS", "GPU_TE", "GpuSpec",
    "KernelProfile", "Layout", "MemoryEstimate", "PlanRequest", "PlanResult", "Precision", "Rejection",
    "RejectionKind", "TrainingShape", "check_fits", "closest_to_fitting", "estimate", "family_outcomes", "gpu_spec",
    "not_shown", "parse_memory", "plan",
]
