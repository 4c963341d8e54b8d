"""Choose a parallel layout before submitting: memory and step-time estimates.

Public surface (see docs/plan.md):
  ``estimate`` / ``TrainingShape`` / ``MemoryEstimate``  per-GPU memory, broken down
  ``plan`` / ``PlanRequest`` / ``PlanResult``             every layout, ranked, with reasons
  ``LayoutPin`` / ``parse_layout``                         fix some dimensions (``--layout``)
  ``Stack`` / ``MEGALONG`` / ``NEMO_PERFORMANCE``          software switches that change memory or time
  ``Workload``                                             the samples' attention work and imbalance
  ``Efficiency`` / ``EFFICIENCY``                          calibrated shares of peak per GPU generation
  ``load_published``                                       the published measured runs they are fitted on
  ``rejection_counts`` / ``closest_to_fitting``            the rejections summarised (``summary``)
  ``check_fits``                                           one layout: fits or not, with a message
  ``gpu_spec``                                             a100 / h100 / h200 / b200 figures
"""

from megalong.plan.efficiency import EFFICIENCY, Efficiency
from megalong.plan.hardware import GPUS, GpuSpec, gpu_spec, parse_memory
from megalong.plan.memory import (
    BF16, CPU_LOCAL, FP8, FP32, GPU_TE, KernelProfile, MemoryEstimate, Precision, TrainingShape, estimate,
)
from megalong.plan.pin import LayoutPin, parse_layout
from megalong.plan.planner import (
    Candidate, FitCheck, Layout, PlanRequest, PlanResult, Rejection, RejectionKind, check_fits, plan,
)
from megalong.plan.published import load_published
from megalong.plan.stack import MEGALONG, NEMO_PERFORMANCE, Stack
from megalong.plan.summary import closest_to_fitting, not_shown, rejection_counts
from megalong.plan.workload import Workload

__all__ = [
    "BF16", "CPU_LOCAL", "Candidate", "EFFICIENCY", "Efficiency", "FP32", "FP8", "FitCheck", "GPUS", "GPU_TE",
    "GpuSpec", "KernelProfile", "Layout", "LayoutPin", "MEGALONG", "MemoryEstimate", "NEMO_PERFORMANCE",
    "PlanRequest", "PlanResult", "Precision", "Rejection", "RejectionKind", "Stack", "TrainingShape", "Workload",
    "check_fits", "closest_to_fitting", "estimate", "gpu_spec", "load_published", "not_shown", "parse_layout",
    "parse_memory", "plan", "rejection_counts",
]
