"""What share of a GPU's peak each kind of work reaches: the planner's calibrated constants.

Separate constants, because the published measurements disagree with one shared "55% of
peak" in opposite directions (issue 26): FP8 GEMMs gain far less than 2x over bf16, and
flash attention's forward + backward runs well below the GEMMs' share of peak.

* ``gemm_bf16`` / ``gemm_fp8``: share of the dense bf16 / FP8 peak reached by a transformer
  layer's GEMMs, the element-wise work between them (norms, SwiGLU, RoPE, FP8 casts) folded
  in. The output layer (logits) stays bf16 under FP8, as in Megatron and Transformer Engine.
* ``attention``: share of the bf16 peak reached by flash attention, forward + backward, on
  its causal model FLOPs (3 x the forward's 2 x 2 x queries x attended keys x head dim).
* ``tp_overlap``: share of the tensor-parallel collectives hidden behind the GEMMs when the
  stack overlaps them (TE userbuffers; megalong.plan.stack).

How they were found: ``python benchmarks/plan_accuracy.py --fit`` fits them, by least
squares on log(planner / published), to the rows of megalong/plan/published_runs.yaml that
are not held out (all Megatron-based, all FP8; none published at bf16). Its output is
pasted below, rounded; the benchmark's default run shows the accuracy they give, on the
fitted and on the held-out rows. What the published rows cannot fix:

* ``gemm_bf16`` on Hopper: no Megatron table gives bf16 Llama figures. It is set so that the
  planner's bf16 / FP8 throughput ratio equals torchtitan's measured one for the same model
  and layout (Table 1 of benchmarks/llama3_h100_202412_torchtitan.md, FSDP + compile:
  6,667 vs 8,532 tokens/s per GPU), which the fit also does.
* Blackwell bf16 and everything Ampere: no published rows; Blackwell's ``gemm_bf16`` takes
  Hopper's bf16/FP8 ratio, Ampere takes Hopper's bf16 constants. Uncalibrated: the
  planner's output says so for those GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalong.plan.hardware import Generation, GpuSpec


@dataclass(frozen=True)
class Efficiency:
    gemm_bf16: float
    gemm_fp8: float
    attention: float
    tp_overlap: float
    calibrated: bool = True  # False: borrowed from another generation (see the module docstring)


# `python benchmarks/plan_accuracy.py --fit`, rounded to 3 digits (Ampere: Hopper's, borrowed).
EFFICIENCY: dict[Generation, Efficiency] = {
    "hopper": Efficiency(gemm_bf16=0.584, gemm_fp8=0.437, attention=0.268, tp_overlap=0.85),
    "blackwell": Efficiency(gemm_bf16=0.534, gemm_fp8=0.400, attention=0.354, tp_overlap=0.85),
    "ampere": Efficiency(gemm_bf16=0.584, gemm_fp8=0.437, attention=0.268, tp_overlap=0.85, calibrated=False),
}


def efficiency_for(gpu: GpuSpec) -> Efficiency:
    return EFFICIENCY[gpu.generation]
