"""What the training software does that changes memory or step time, beyond the layout.

The planner predicts megalong's own runs, but its constants are calibrated on runs of other
Megatron-based stacks (NeMo, Megatron-Bridge; megalong/plan/published_runs.yaml), which differ
in a few switches. Each switch is named here, with what megalong does and why it matters:

* ``grad_reduce_in_fp32``: Megatron DDP's contiguous gradient buffer in fp32 (4 bytes per
  parameter, and fp32 reduce-scatters) or in the parameter dtype (2 bytes). megalong builds
  its DDP with ``grad_reduce_in_fp32=True`` (megalong/training/optimizer.py); NeMo's
  performance recipes set it False.
* ``fp8_param_gather``: with FP8, the weights themselves are FP8 tensors (Megatron's
  ``--fp8-param-gather``), instead of bf16 weights plus the FP8 copies Transformer Engine caches
  for its GEMMs. megalong keeps bf16 weights (TE's ``autocast`` around bf16 layers); NeMo's FP8
  recipes turn it on.
* ``tp_comm_overlap``: TP all-gathers/reduce-scatters pipelined with the GEMMs (TE userbuffers).
  megalong does not enable it; NeMo's 70B recipe does.
* ``overlap_dp_comm``: the gradient reduce-scatter runs during the last micro-batch's backward
  and the parameter all-gather during the first forward (Megatron's ``overlap_grad_reduce`` /
  ``overlap_param_gather``); megalong's recipes turn both on (``runtime:``).
* ``cp_relayout``: under CP with Transformer Engine, megalong moves q, k, v into TE's
  per-document (THD) layout and the output back, one all-to-all each way
  (megalong/model/attention/thd_relayout.py); stacks without document masking do not.
* ``fused_rope``: Megatron's fused RoPE kernel saves no cos/sin tables and no rotated copies
  beyond q and k. megalong sets ``apply_rope_fusion=False`` (megalong/model/llama.py); NeMo's
  and Megatron-Bridge's Llama configs set it True.
* ``deallocate_pipeline_outputs``: a pipeline stage frees its output once sent. megalong
  keeps Megatron-Core's default (False); NeMo sets True.
* ``fsdp``: weights and gradients sharded over the data-parallel ranks like the optimizer
  states (ZeRO-3: Megatron FSDP, PyTorch FSDP), gathered layer by layer for every
  micro-batch. megalong uses Megatron's distributed optimizer (ZeRO-1) only; some published
  runs used FSDP.
* ``expandable_segments``: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` maps memory
  in pages instead of fixed blocks, so the caching allocator's fragmentation (5% of the rest
  otherwise, hardware.GpuSpec.fragmentation) is taken as none. megalong does not set it;
  NeMo's and Megatron-Bridge's performance launchers do.

Document masking is not a switch here: it is in the workload (megalong.plan.workload), the
segment lengths attention sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Stack:
    name: str
    grad_reduce_in_fp32: bool
    fp8_param_gather: bool
    tp_comm_overlap: bool
    overlap_dp_comm: bool
    cp_relayout: bool
    fused_rope: bool
    deallocate_pipeline_outputs: bool
    expandable_segments: bool
    fsdp: bool = False

    def with_(self, **changes) -> "Stack":
        return replace(self, **changes)


MEGALONG = Stack("megalong", grad_reduce_in_fp32=True, fp8_param_gather=False, tp_comm_overlap=False,
                 overlap_dp_comm=True, cp_relayout=True, fused_rope=False, deallocate_pipeline_outputs=False,
                 expandable_segments=False)

# NeMo / Megatron-Bridge performance recipes (sources in published_runs.yaml).
NEMO_PERFORMANCE = Stack("nemo-performance", grad_reduce_in_fp32=False, fp8_param_gather=True,
                         tp_comm_overlap=True, overlap_dp_comm=True, cp_relayout=False, fused_rope=True,
                         deallocate_pipeline_outputs=True, expandable_segments=True)
