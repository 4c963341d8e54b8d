"""Step time of a layout, from FLOPs, calibrated kernel efficiencies and communication volume.

A model, not a simulator; its constants are fitted to published measured runs
(megalong.plan.efficiency; accuracy: benchmarks/plan_accuracy.py, docs/plan.md). Per GPU:

* GEMMs: 2 x (weights of every GEMM) FLOPs per token forward, backward 2 x forward, full
  recomputation one more forward; at ``gemm_fp8`` x FP8 peak for the layers' GEMMs under FP8,
  ``gemm_bf16`` x bf16 peak otherwise (the logits GEMM is always bf16).
* Attention: causal, 2 x 2 x (query heads x head dim) x sum over documents of d^2 / 2 FLOPs
  per layer forward (QK^T and PV; Korthikanti et al. 2022 section 6), backward 2 x forward,
  selective or full recomputation one more forward; at ``attention`` x bf16 peak. The sum of
  squared document lengths is the workload's (megalong.plan.workload): the recipe's mixture
  with document masking, one full-length document otherwise.
* Work is split evenly over TP x CP x PP; the ranks it is not even over cost extra
  (``imbalance_s``): the heaviest CP rank's attention and the heaviest DP rank's samples,
  computed from the workload with megalong's own sharding and balancing code.
* Pipeline bubble: (p - 1) / (v m) of the compute (Narayanan et al., SC'21).
* TP with sequence parallelism: per layer and micro-batch 4 all-gathers / reduce-scatters of
  [s, b, h] forward and 6 backward (the input re-gathers of Korthikanti 4.2.2), 4 more when
  layers are recomputed; ``tp_overlap`` of it hidden when the stack overlaps TP communication.
* CP (ring): each layer passes K and V around the ring forward, K, V and their gradients
  backward, hidden behind the attention compute (only the excess counts). With megalong's
  relayout into TE's THD layout (stack.cp_relayout), one all-to-all of q, k, v and one of the
  output forward, and the same of their gradients backward, not hidden.
* DP: gradients reduce-scattered and weights all-gathered once per step (distributed
  optimizer; an all-reduce without it). With overlap (stack.overlap_dp_comm) the reduce-scatter
  runs during the last micro-batch's backward and the all-gather during the first forward:
  only what exceeds them counts.
* PP: one [s, b, h] activation and its gradient per micro-batch (per chunk when interleaved)
  per stage boundary; interleaved schedules overlap it with the next chunk's compute.
* FSDP (stack.fsdp): weights gathered twice and gradients reduce-scattered every
  micro-batch, hidden behind that micro-batch's compute.
Link speed is NVLink when the group fits in a node, the network otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megalong.config.parallel import ParallelConfig
from megalong.model.config import ModelConfig
from megalong.plan.efficiency import Efficiency
from megalong.plan.hardware import GpuSpec
from megalong.plan.memory import Precision, TrainingShape
from megalong.plan.stack import Stack
from megalong.plan.workload import Workload


@dataclass
class StepTime:
    gemm_s: float
    attention_s: float
    imbalance_s: float
    bubble_s: float
    tp_comm_s: float
    cp_comm_s: float
    dp_comm_s: float
    pp_comm_s: float
    model_flops: float  # per step, whole job, without recomputation (for MFU)

    @property
    def compute_s(self) -> float:
        return self.gemm_s + self.attention_s

    @property
    def total_s(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name.endswith("_s"))

    def breakdown(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_s")}

    def tokens_per_s_per_gpu(self, tokens_per_step: int, world_size: int) -> float:
        return tokens_per_step / self.total_s / world_size

    def mfu(self, gpu: GpuSpec, world_size: int) -> float:
        return self.model_flops / self.total_s / world_size / (gpu.bf16_tflops * 1e12)


def _link_bytes_per_s(group_span_gpus: int, gpus_per_node: int, gpu: GpuSpec) -> float:
    bandwidth = gpu.nvlink_gbps if group_span_gpus <= gpus_per_node else gpu.network_gbps
    return bandwidth * gpu.link_efficiency * 1e9


def layer_gemm_weights(model: ModelConfig) -> int:
    """Weights of one layer's GEMMs (QKV, output projection, FC1 gate+up, FC2)."""
    h = model.hidden_size
    return (h * (model.num_attention_heads + 2 * model.num_query_groups) * model.head_dim
            + model.num_attention_heads * model.head_dim * h + 3 * h * model.ffn_hidden_size)


def estimate_step_time(model: ModelConfig, parallel: ParallelConfig, shape: TrainingShape, *,
                       world_size: int, gpus_per_node: int, gpu: GpuSpec, precision: Precision,
                       efficiency: Efficiency, stack: Stack, workload: Workload) -> StepTime:
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    dp = parallel.data_parallel_size(world_size)
    v = parallel.virtual_pipeline or 1
    h, L, S = model.hidden_size, model.num_layers, shape.seq_length
    V = model.padded_vocab_size(tp)
    m = shape.num_microbatches
    sequences = dp * shape.micro_batch * m
    tokens = sequences * S

    # FLOPs of the whole step (every GPU together).
    gemm_fwd = 2.0 * layer_gemm_weights(model) * L * tokens
    logits_fwd = 2.0 * h * V * tokens
    attention_fwd = 2.0 * 2.0 * model.num_attention_heads * model.head_dim * L * (workload.mean_attention_cost / 2) \
        * sequences
    model_flops = 3 * (gemm_fwd + logits_fwd + attention_fwd)
    recompute_gemm = gemm_fwd if shape.recompute == "full" else 0.0
    recompute_attention = attention_fwd if shape.recompute in ("full", "selective") else 0.0

    bf16_peak = gpu.bf16_tflops * 1e12
    if precision.fp8 and gpu.fp8_tflops:
        layer_gemm_rate = gpu.fp8_tflops * 1e12 * efficiency.gemm_fp8
    else:
        layer_gemm_rate = bf16_peak * efficiency.gemm_bf16
    gemm_s = ((3 * gemm_fwd + recompute_gemm) / layer_gemm_rate
              + 3 * logits_fwd / (bf16_peak * efficiency.gemm_bf16)) / world_size
    attention_s = (3 * attention_fwd + recompute_attention) / (bf16_peak * efficiency.attention) / world_size

    # The ranks the work is not even over.
    cp_inflation = workload.cp_inflation(cp, per_document=stack.cp_relayout)
    attention_on_slowest_cp_rank = attention_s * cp_inflation
    compute = gemm_s + attention_on_slowest_cp_rank
    dp_inflation = workload.dp_inflation(dp, attention_on_slowest_cp_rank / compute if compute else 0.0)
    imbalance_s = compute * dp_inflation - gemm_s - attention_s
    busiest = gemm_s + attention_s + imbalance_s
    bubble_s = busiest * (pp - 1) / (v * m)

    e = precision.activation_bytes
    s_local = S // cp
    layers_here = L // pp
    tp_comm = 0.0
    if tp > 1:
        collectives = 10 + (4 if shape.recompute == "full" else 0)
        volume = collectives * s_local * shape.micro_batch * h * e * (tp - 1) / tp
        exposed = 1 - (efficiency.tp_overlap if stack.tp_comm_overlap else 0.0)
        tp_comm = exposed * volume * layers_here * m / _link_bytes_per_s(tp, gpus_per_node, gpu)
    cp_comm = 0.0
    if cp > 1:
        cp_link = _link_bytes_per_s(tp * cp, gpus_per_node, gpu)
        kv_bytes = 2 * s_local * shape.micro_batch * model.num_query_groups * model.head_dim * e / tp
        # forward: K,V around the ring; backward: K,V and dK,dV; recomputation repeats the forward.
        passes = 1 + 2 + (1 if shape.recompute else 0)
        ring_time = (cp - 1) * kv_bytes * passes * layers_here * m / cp_link
        cp_comm = max(0.0, ring_time - attention_on_slowest_cp_rank)
        if stack.cp_relayout:
            q_bytes = s_local * shape.micro_batch * h * e / tp
            exchanged = (2 * q_bytes + kv_bytes) * (cp - 1) / cp  # q, k, v in and the output back
            cp_comm += exchanged * passes * layers_here * m / cp_link
    dp_comm = 0.0
    if dp * cp > 1:
        params = layer_gemm_weights(model) * L // pp // tp + V // tp * h
        share = (dp * cp - 1) / (dp * cp)
        link = _link_bytes_per_s(tp * cp * pp * dp, gpus_per_node, gpu)
        gather_bytes = 1 if precision.fp8_params else precision.param_bytes
        per_microbatch = busiest / m
        if stack.fsdp:
            # Weights gathered for the forward and again for the backward, gradients
            # reduce-scattered, every micro-batch; prefetched behind that micro-batch's compute.
            per_microbatch_comm = params * (2 * gather_bytes + precision.grad_bytes) * share / link
            dp_comm = m * max(0.0, per_microbatch_comm - per_microbatch)
        else:
            if parallel.distributed_optimizer:
                reduce_s = params * precision.grad_bytes * share / link
                gather_s = params * gather_bytes * share / link
            else:
                reduce_s, gather_s = 2 * params * precision.grad_bytes * share / link, 0.0
            if stack.overlap_dp_comm:
                reduce_s = max(0.0, reduce_s - per_microbatch * 2 / 3)  # the last backward
                gather_s = max(0.0, gather_s - per_microbatch / 3)  # the first forward
            dp_comm = reduce_s + gather_s
    pp_comm = 0.0
    if pp > 1:
        per_chunk = 2 * s_local * shape.micro_batch * h * e / (tp if parallel.sequence_parallel else 1) \
            / _link_bytes_per_s(world_size, gpus_per_node, gpu)
        if v > 1:
            # Interleaved: megalong and NeMo set overlap_p2p_comm, so each transfer runs beside
            # the next chunk's compute; only what exceeds it counts.
            pp_comm = m * v * max(0.0, per_chunk - busiest / (m * v))
        else:
            pp_comm = m * per_chunk
    return StepTime(gemm_s=gemm_s, attention_s=attention_s, imbalance_s=imbalance_s, bubble_s=bubble_s,
                    tp_comm_s=tp_comm, cp_comm_s=cp_comm, dp_comm_s=dp_comm, pp_comm_s=pp_comm,
                    model_flops=model_flops)
