"""Step time of a layout, from FLOPs and communication volume.

A ranking tool, not a simulator: it is meant to order layouts the way real runs would
(more recomputation costs FLOPs, more TP costs exposed all-gathers, a deeper pipeline a
bubble) and to give the right order of magnitude. Formulas:

* Model FLOPs per token (forward): 2 x (weights of every GEMM) + causal attention
  2 x 2 x s_eff x h / 2 per layer (QK^T and PV, half the matrix under a causal mask;
  Narayanan et al. SC'21 appendix, Korthikanti et al. 2022 section 6), plus the logits
  2 h V. Backward = 2 x forward. Recomputation adds one forward of the layers (full) or
  of the core attention (selective).
* Work is split evenly over all GPUs (TP, CP, PP and DP all divide it) and runs at
  ``matmul_efficiency`` x peak (FP8 speeds up the GEMMs only, not attention).
* Pipeline bubble: (p - 1) / (v m) of the compute (Narayanan et al.).
* TP with sequence parallelism: per layer and micro-batch 4 all-gathers / reduce-scatters
  of [s, b, h] forward and 6 backward (the input re-gathers of Korthikanti 4.2.2), 4 more
  when layers are recomputed; not overlapped. NVLink inside a node.
* CP (ring): each layer passes K and V around the ring forward, K, V and their gradients
  backward; overlapped with the attention compute, so only the excess counts.
* DP: the gradients are reduce-scattered (or all-reduced) once per step and, with the
  distributed optimizer, the weights all-gathered: 2 x bytes x (n - 1) / n, counted in full.
* PP: one [s, b, h] activation and its gradient per micro-batch per stage boundary.
Link speed is NVLink when the group fits in a node, the network otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalong.config.parallel import ParallelConfig
from megalong.model.config import ModelConfig
from megalong.plan.hardware import GpuSpec
from megalong.plan.memory import Precision, TrainingShape


@dataclass
class StepTime:
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    cp_comm_s: float
    dp_comm_s: float
    pp_comm_s: float
    model_flops: float  # per step, whole job, without recomputation (for MFU)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_comm_s + self.cp_comm_s + self.dp_comm_s + self.pp_comm_s

    def tokens_per_s_per_gpu(self, tokens_per_step: int, world_size: int) -> float:
        return tokens_per_step / self.total_s / world_size

    def mfu(self, gpu: GpuSpec, world_size: int) -> float:
        return self.model_flops / self.total_s / world_size / (gpu.bf16_tflops * 1e12)


def _link_gbps(group_span_gpus: int, gpus_per_node: int, gpu: GpuSpec) -> float:
    bandwidth = gpu.nvlink_gbps if group_span_gpus <= gpus_per_node else gpu.network_gbps
    return bandwidth * gpu.link_efficiency * 1e9


def estimate_step_time(model: ModelConfig, parallel: ParallelConfig, shape: TrainingShape, *,
                       world_size: int, gpus_per_node: int, gpu: GpuSpec, precision: Precision) -> StepTime:
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    dp = parallel.data_parallel_size(world_size)
    v = parallel.virtual_pipeline or 1
    h, L, S = model.hidden_size, model.num_layers, shape.seq_length
    V = model.padded_vocab_size(tp)
    sequences = dp * shape.micro_batch * shape.num_microbatches
    tokens = sequences * S

    gemm_weights = sum(
        value for key, value in {
            "qkv": h * (model.num_attention_heads + 2 * model.num_query_groups) * model.head_dim,
            "proj": h * h, "fc1": 2 * h * model.ffn_hidden_size, "fc2": h * model.ffn_hidden_size,
        }.items()
    )
    gemm_fwd = 2 * gemm_weights * L * tokens
    attention_fwd = 2 * S * h * L * tokens  # 4 s h per token per layer, halved by causality
    logits_fwd = 2 * h * V * tokens
    model_flops = 3 * (gemm_fwd + attention_fwd + logits_fwd)
    recompute_gemm = gemm_fwd if shape.recompute == "full" else 0.0
    recompute_attention = attention_fwd if shape.recompute in ("full", "selective") else 0.0

    peak = gpu.bf16_tflops * 1e12 * gpu.matmul_efficiency
    gemm_peak = (gpu.fp8_tflops * 1e12 * gpu.matmul_efficiency) if (precision.fp8 and gpu.fp8_tflops) else peak
    gemm_time = (3 * gemm_fwd + recompute_gemm + 3 * logits_fwd) / gemm_peak / world_size
    attention_time = (3 * attention_fwd + recompute_attention) / peak / world_size
    compute = gemm_time + attention_time
    bubble = compute * (pp - 1) / (v * shape.num_microbatches)

    e = precision.activation_bytes
    s_local = S // cp
    microbatches = shape.num_microbatches
    layers_here = L // pp
    tp_comm = 0.0
    if tp > 1:
        collectives = 10 + (4 if shape.recompute == "full" else 0)
        volume = collectives * s_local * shape.micro_batch * h * e * (tp - 1) / tp
        tp_comm = volume * layers_here * microbatches / _link_gbps(tp, gpus_per_node, gpu)
    cp_comm = 0.0
    if cp > 1:
        kv_bytes = 2 * s_local * shape.micro_batch * model.num_query_groups * model.head_dim * e / tp
        # forward: K,V around the ring; backward: K,V and dK,dV.
        ring = (cp - 1) * kv_bytes * (1 + 2) * (2 if shape.recompute else 1)
        ring_time = ring * layers_here * microbatches / _link_gbps(tp * cp, gpus_per_node, gpu)
        cp_comm = max(0.0, ring_time - attention_time)  # hidden behind the attention compute
    dp_comm = 0.0
    if dp * cp > 1:
        params = sum(
            value for value in (gemm_weights * L // pp // tp, V // tp * h)
        )
        volume = 2 * params * precision.grad_bytes * (dp * cp - 1) / (dp * cp)
        dp_comm = volume / _link_gbps(tp * cp * pp * dp, gpus_per_node, gpu)
    pp_comm = 0.0
    if pp > 1:
        volume = 2 * s_local * shape.micro_batch * h * e / (tp if parallel.sequence_parallel else 1)
        pp_comm = volume * microbatches * v / _link_gbps(world_size, gpus_per_node, gpu)
    return StepTime(compute_s=compute, bubble_s=bubble, tp_comm_s=tp_comm, cp_comm_s=cp_comm,
                    dp_comm_s=dp_comm, pp_comm_s=pp_comm, model_flops=model_flops)
