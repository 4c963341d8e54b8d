"""Per-GPU memory of a training step of a Llama-3 model on Megatron-Core.

The estimate is a sum of named parts, each a formula in the model shape and the layout:

* weights, gradients and optimizer states (the "model states" of ZeRO / Megatron's
  distributed optimizer);
* activations saved for the backward pass, following the per-tensor accounting of
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
  (MLSys 2023, arXiv:2205.05198), section 4, adapted to Llama (RMSNorm, SwiGLU, grouped-
  query attention, RoPE, no dropout, no biases) and extended with context parallelism
  (the sequence is split over CP ranks, so every per-token term uses s / CP);
* logits and loss (Megatron's vocab-parallel cross entropy, or a chunked one);
* communication and workspace buffers; and a framework overhead on GPUs.

Notation used in every formula below (all per GPU):
  s = seq_length / CP      tokens of one sequence this rank holds
  b = micro-batch size      h = hidden size      a = attention heads   g = KV heads
  d = h / a (head dim)      f = FFN hidden size  V = padded vocabulary
  t = TP size               p = PP size          v = virtual stages    L = layers
  sp = t with sequence parallelism, else 1 (tensors Megatron splits along the sequence)
  e = bytes of one activation element (2 for bf16, 4 for fp32 on CPU)
A tensor "of k sbh" has k * s * b * h elements.

What differs between a GPU with Transformer Engine and the CPU test path is not a
different formula but a :class:`KernelProfile` (fused RMSNorm/SwiGLU or not, flash
attention or megalong's tiled PyTorch-SDPA attention, fused optimizer or not) and a
:class:`Precision` (bf16 + fp32 master weights, or fp32 everywhere). The CPU profile is
what the acceptance test checks against measured steps, so the formulas are exercised by
real runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from megalong.config.parallel import ParallelConfig
from megalong.model.config import ModelConfig

GB = 1e9


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state."""

    name: str
    param_bytes: int  # model weights as the layers hold them
    grad_bytes: int  # Megatron DDP's contiguous gradient buffer (grad_reduce_in_fp32 -> 4)
    master_bytes: int  # fp32 master copy kept by the optimizer (0 when the weights are fp32)
    optimizer_bytes: int  # Adam first and second moments, fp32
    activation_bytes: int  # e above
    # FP8 (Transformer Engine): GEMM inputs saved in 1 byte, plus FP8 weight copies.
    fp8: bool = False
    # FP8 weights are the parameters themselves (Megatron's --fp8-param-gather): no bf16 copy
    # beside the FP8 ones (megalong.plan.stack).
    fp8_params: bool = False

    def for_stack(self, grad_reduce_in_fp32: bool, fp8_param_gather: bool) -> "Precision":
        """This precision as a stack runs it: the gradient buffer in fp32 or in the weights'
        dtype, and FP8 weights as parameters or as copies."""
        grad_bytes = 4 if grad_reduce_in_fp32 else self.param_bytes
        return dataclasses.replace(self, grad_bytes=grad_bytes, fp8_params=self.fp8 and fp8_param_gather)


BF16 = Precision("bf16", param_bytes=2, grad_bytes=4, master_bytes=4, optimizer_bytes=8, activation_bytes=2)
FP8 = Precision("fp8", param_bytes=2, grad_bytes=4, master_bytes=4, optimizer_bytes=8, activation_bytes=2,
                fp8=True)
FP32 = Precision("fp32", param_bytes=4, grad_bytes=4, master_bytes=0, optimizer_bytes=8, activation_bytes=4)
PRECISIONS = {p.name: p for p in (BF16, FP8, FP32)}


@dataclass(frozen=True)
class KernelProfile:
    """Which kernels run, as far as memory is concerned."""

    name: str
    # Fused RMSNorm (TE/Apex) saves only the input and 1/rms; the unfused torch one also
    # keeps the normalised tensor x * rsqrt(mean(x^2)).
    fused_norm: bool
    # Megatron's fused SwiGLU saves only its input [s, b, 2f]; the unfused
    # silu(x1) * (x2 + glu_linear_offset) also keeps silu(x1), the shifted x2 and the product.
    fused_swiglu: bool
    # "flash": flash/fused attention, O(s) memory (saves q, k, v, output, log-sum-exp).
    # "tiled": megalong's CPU path (megalong.model.attention.local.sdpa_attention): one
    # PyTorch SDPA call per tile of ``attention_tile`` queries over the keys that tile can
    # see. Each call runs PyTorch's fused CPU flash kernel, which keeps O(s) statistics
    # like flash attention, but SDPA first turns the boolean document mask of the tile
    # into an additive float mask [b, 1, tile, keys] that the kernel saves for backward,
    # so the masks add up to O(s^2 / 2) elements per sample (not per head).
    attention: Literal["flash", "tiled"]
    # Fused optimizers (TE/Apex FusedAdam) update in place; torch's single-tensor AdamW
    # makes two temporaries the size of the largest parameter.
    fused_optimizer: bool
    # Megatron's unfused RoPE (apply_rope_fusion=False, as megalong.model.llama sets it)
    # keeps cos/sin tables of [s, d] per application.
    fused_rope: bool = False
    # A saved copy of the pre-RoPE query, [s, b, h/t]. Measured absent on the CPU path:
    # in Megatron-Core 0.16 the query is a split view of the QKV output whose reshape to
    # [s, b, a/t, d] is again a view, and RoPE's products save cos/sin, not their input.
    # GPU_TE keeps the term until a GPU run validates it (it also stands in for the
    # contiguous THD copies megalong's TE kernel makes of q, k, v when b > 1).
    rope_query_copy: bool = True
    # Queries per SDPA call of the "tiled" attention (megalong.model.attention.blocks.DEFAULT_TILE).
    attention_tile: int = 256


GPU_TE = KernelProfile("gpu-te", fused_norm=True, fused_swiglu=True, attention="flash", fused_optimizer=True)
# The CPU path: torch RMSNorm and SwiGLU, megalong's tiled SDPA attention, torch AdamW.
CPU_LOCAL = KernelProfile("cpu-local", fused_norm=False, fused_swiglu=False, attention="tiled",
                          fused_optimizer=False, rope_query_copy=False)


@dataclass(frozen=True)
class TrainingShape:
    """The batch and the memory-saving switches of a run."""

    seq_length: int
    micro_batch: int = 1
    num_microbatches: int = 1  # per step and per DP rank: global_batch / (DP x micro_batch)
    recompute: Optional[Literal["selective", "full"]] = None
    recompute_num_layers: int = 1  # layers per checkpointed group with full recompute
    # Tokens per chunk of a chunked cross entropy; None = Megatron's full logits.
    loss_chunk_tokens: Optional[int] = None
    # Megatron-LM frees each pipeline stage's output once sent (deallocate_pipeline_outputs);
    # megalong's TransformerConfig leaves Megatron-Core's default (False, kept).
    deallocate_pipeline_outputs: bool = False


@dataclass
class MemoryEstimate:
    """Predicted peak bytes on the busiest GPU, split by what holds them."""

    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    logits_and_loss: float
    communication_buffers: float
    framework_overhead: float
    pipeline_stage: int  # which stage (0-based) is the busiest
    notes: list[str] = field(default_factory=list)

    PARTS = ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss",
             "communication_buffers", "framework_overhead")

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in self.PARTS)

    @property
    def static(self) -> float:
        """Held for the whole run: weights, gradients, optimizer states."""
        return self.weights + self.gradients + self.optimizer_states

    def breakdown(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.PARTS}

    def describe(self, unit: float = GB, unit_name: str = "GB") -> str:
        parts = ", ".join(
            f"{name.replace('_', ' ')} {value / unit:.1f}" for name, value in self.breakdown().items() if value
        )
        return f"{self.total / unit:.1f} {unit_name} ({parts})"


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

def layer_parameters(model: ModelConfig, tp: int) -> dict[str, int]:
    """Weights of one transformer layer on one TP rank (Llama: no biases)."""
    h, d, a, g, f = model.hidden_size, model.head_dim, model.num_attention_heads, model.num_query_groups, \
        model.ffn_hidden_size
    return {
        "qkv": h * (a + 2 * g) * d // tp,  # column-parallel: heads split over TP
        "proj": a * d * h // tp,  # row-parallel
        "fc1": h * 2 * f // tp,  # gate and up projections, column-parallel
        "fc2": f * h // tp,  # row-parallel
        "norms": 2 * h,  # two RMSNorm weights, replicated on every TP rank
    }


def stage_parameters(model: ModelConfig, parallel: ParallelConfig, stage: int) -> int:
    """Weights held by pipeline stage ``stage`` on one TP rank."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    per_layer = sum(layer_parameters(model, tp).values())
    count = per_layer * model.num_layers // pp
    embedding = model.padded_vocab_size(tp) // tp * model.hidden_size
    if stage == 0:
        count += embedding
    if stage == pp - 1:
        count += model.hidden_size  # final norm
        # The output layer; with tied embeddings and PP=1 it is the embedding itself,
        # with PP>1 Megatron keeps a synchronised copy on the last stage.
        if not model.tie_word_embeddings or pp > 1:
            count += embedding
    return count


def largest_parameter(model: ModelConfig, tp: int) -> int:
    layer = layer_parameters(model, tp)
    embedding = model.padded_vocab_size(tp) // tp * model.hidden_size
    return max(max(layer.values()), embedding)


# --------------------------------------------------------------------------------------
# Activations of one transformer layer
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Dims:
    s: int
    b: int
    h: int
    a: int
    g: int
    d: int
    f: int
    t: int
    sp: int
    e: int
    cp: int = 1

    @property
    def sbh(self) -> int:
        return self.s * self.b * self.h


def _dims(model: ModelConfig, parallel: ParallelConfig, shape: TrainingShape, precision: Precision) -> _Dims:
    tp = parallel.tensor_parallel
    sp = tp if (parallel.sequence_parallel and tp > 1) else 1
    return _Dims(
        s=shape.seq_length // parallel.context_parallel, b=shape.micro_batch, h=model.hidden_size,
        a=model.num_attention_heads, g=model.num_query_groups, d=model.head_dim, f=model.ffn_hidden_size,
        t=tp, sp=sp, e=precision.activation_bytes, cp=parallel.context_parallel,
    )


def tiled_mask_elements(s: int, tile: int) -> int:
    """Elements of the additive masks one sample's tiled SDPA attention saves, per layer.

    ``local.key_spans`` gives the query tile [q, q + tile) the keys from the start of its
    first query's document up to its last query. With one document per sequence (the
    worst case, and plain causal training) that is every key before q + tile, so the
    masks hold sum over tiles of (queries x keys) = tile^2 n (n + 1) / 2 + r s for
    s = n tile + r: about s^2 / 2 for s >> tile, s^2 when one tile covers the sequence.
    Packed short documents shrink the spans, so this is an upper bound.
    """
    full, rest = divmod(s, tile)
    return tile * tile * full * (full + 1) // 2 + rest * s


def layer_activations(x: _Dims, profile: KernelProfile, precision: Precision,
                      recompute_attention: bool = False) -> dict[str, float]:
    """Bytes one transformer layer saves for its backward pass, by tensor.

    Korthikanti et al. (eq. 1) count, for a GPT layer with 16-bit activations and no
    parallelism, ``sbh (34 + 5 a s / h)`` bytes: 11 sbh + 5 a s^2 b in attention and
    19 sbh in the MLP and norms, and show that TP with sequence parallelism divides every
    term by t (eq. 4), and that recomputing only the core attention ("selective
    recomputation") removes the ``5 a s^2 b`` term (eq. 6). Llama differs: RMSNorm, a
    SwiGLU MLP of width f, k/v with g < a heads, RoPE, and no dropout masks. Each entry
    below is one saved tensor, its size and why it is kept.
    """
    e = x.e
    e_in = 1 if precision.fp8 else e  # TE saves FP8 copies of GEMM inputs
    sbh = x.sbh
    kv = x.g * x.d / x.h  # size of k (or v) relative to q
    parts: dict[str, float] = {}

    # Two RMSNorms (before attention, before the MLP). Each keeps its input x (for the
    # gradient of x / rms(x)); the unfused torch RMSNorm also keeps x * rsqrt(...) (the
    # saved operand of the multiply by the weight). Both are sequence-parallel (/sp).
    parts["norm inputs"] = 2 * e * sbh / x.sp
    if not profile.fused_norm:
        parts["normalised tensors"] = 2 * e * sbh / x.sp
    # The norm outputs are the inputs of the QKV and FC1 GEMMs, saved by those linears;
    # with sequence parallelism Megatron/TE save the local shard and all-gather it again
    # in the backward pass (Korthikanti, section 4.2.2), hence /sp, not /t.
    parts["QKV and FC1 inputs"] = 2 * e_in * sbh / x.sp

    # Attention block. Megatron splits the fused QKV output into views; v (and k before
    # RoPE) stay views of it, so the whole [s, b, (a + 2g) d / t] storage is kept alive.
    parts["QKV output"] = e * sbh * (1 + 2 * kv) / x.t
    # RoPE (not fused) makes new q and k tensors, which the core attention saves.
    parts["rotated q and k"] = e * sbh * (1 + kv) / x.t
    if not profile.fused_rope:
        # cos/sin tables of [s, 1, 1, d] built for each of the two applications (4 tables
        # per layer), saved by the products with them; see KernelProfile.rope_query_copy.
        parts["RoPE tables"] = 4 * e * x.s * x.d
        if profile.rope_query_copy:
            parts["pre-RoPE query copy"] = e * sbh / x.t
    if not recompute_attention:
        if profile.attention == "tiled":
            # megalong's tiled SDPA saves, per tile, views of q, k and v (counted above), its
            # output tile and the log-sum-exp (fp32). The output tiles are their own
            # storages: torch.cat copies them into [b, a/t, s, d] and the permute + reshape
            # to [s, b, h/t] copies again (that copy is the projection input, below; the
            # cat result is freed at once). Grouped-query heads run natively
            # (enable_gqa), so k and v are not repeated.
            parts["attention output tiles"] = e * sbh / x.t
            parts["softmax statistics"] = 4 * x.b * x.a * x.s / x.t
            if x.cp == 1:
                # Each tile's boolean mask is turned by SDPA into an additive mask in the
                # activation dtype, [b, 1, tile, keys], saved by the kernel for backward.
                # It is shared by the heads, so not divided by t. Under CP the ring
                # (megalong.model.attention.ring, its own autograd Function) saves only
                # q, k, v, its output and log-sum-exp, and rebuilds masks in backward.
                parts["attention masks"] = e * x.b * tiled_mask_elements(x.s, profile.attention_tile)
        else:
            # Flash attention keeps only its output (saved anyway as the projection
            # input, below) and the log-sum-exp per row, fp32 [b, a/t, s].
            parts["softmax statistics"] = 4 * x.b * x.a * x.s / x.t
    # Input of the output projection (the attention output), [s, b, h/t]: not
    # sequence-parallel (row-parallel linear).
    parts["projection input"] = e_in * sbh / x.t

    # SwiGLU MLP: FC1 output [s, b, 2f/t] (the gate and up halves, saved by silu and the
    # product) and the product [s, b, f/t] (FC2's input). The fused kernel (Megatron's
    # bias_swiglu) keeps only its input and recomputes silu. The unfused one (Megatron-Core's
    # glu(): silu(gate) * (up + glu_linear_offset)) also keeps both factors of the product:
    # silu(gate) and the new tensor up + offset, [s, b, f/t] each.
    mlp = e * x.s * x.b * 2 * x.f / x.t
    mlp += e_in * x.s * x.b * x.f / x.t  # FC2 input
    if not profile.fused_swiglu:
        mlp += 2 * e * x.s * x.b * x.f / x.t  # silu(gate), up + offset
    parts["MLP"] = mlp
    return parts


def attention_backward_moment(x: _Dims, profile: KernelProfile, layer: dict[str, float],
                               rebuilt_attention: float = 0.0) -> float:
    """Change in live bytes, relative to "every layer's activations saved", while the last
    layer's core attention runs its backward pass.

    By then that layer's MLP, second norm and projection input have been freed (their
    backward ran). Flash attention holds dq, dk and dv ([s, b, h/t], and g/a of it twice).
    megalong's tiled attention runs the tiles' SDPA backwards one after the other; each
    returns dq for its queries and dk, dv for its keys, which autograd scatters into
    zero-filled full-size tensors and adds, out of place, to the running sums: the sums
    plus, for a moment, one new full-size term and the result (counted for q). Its saved
    tensors (masks, output tiles) are freed tile by tile, so they are still counted. With
    selective recomputation ``rebuilt_attention`` (the recomputed attention's saved
    tensors) is alive as well.
    """
    post_attention = layer.get("projection input", 0) + layer.get("MLP", 0) + 0.5 * (
        layer.get("norm inputs", 0) + layer.get("normalised tensors", 0) + layer.get("QKV and FC1 inputs", 0))
    grads = x.e * x.sbh * (1 + 2 * x.g / x.a) / x.t
    if profile.attention == "tiled":
        grads += 2 * x.e * x.sbh / x.t
    return rebuilt_attention + grads - post_attention


def layer_backward_transient(x: _Dims, profile: KernelProfile, precision: Precision) -> float:
    """Gradients alive while one layer's backward runs, beyond the saved activations:
    the incoming and outgoing hidden-state gradients (full sequence before a
    sequence-parallel reduce-scatter) and the MLP's gradients of FC2's input and FC1's
    output [s, b, f/t] + [s, b, 2f/t], plus a weight gradient before it is added into the
    fp32 buffer (Megatron's gradient_accumulation_fusion is off)."""
    e = x.e
    grads = 2 * e * x.sbh / x.sp + e * x.sbh + e * x.s * x.b * 3 * x.f / x.t
    weight_grad = precision.param_bytes * 2 * x.f * x.h / x.t
    return grads + weight_grad


# --------------------------------------------------------------------------------------
# Pipeline schedule: how many micro-batches a stage holds
# --------------------------------------------------------------------------------------

def microbatches_in_flight(parallel: ParallelConfig, num_microbatches: int, stage: int) -> float:
    """Micro-batches (in units of a full stage's layers) whose activations stage ``stage``
    holds at its peak under Megatron's 1F1B schedules.

    Plain 1F1B: stage r runs p - r - 1 warm-up forwards, then one more before its first
    backward, so it holds min(p - r, m) micro-batches (Narayanan et al., SC'21).
    Interleaved with v chunks: the warm-up is (p - r - 1) * 2 + (v - 1) * p chunk-forwards
    (Megatron-Core's get_pp_rank_microbatches) plus the current one, each a 1/v share of
    the stage's layers; for r = 0 this is the paper's (1 + (p - 1) / (p v)) factor.
    """
    p = parallel.pipeline_parallel
    v = parallel.virtual_pipeline or 1
    if p == 1:
        return 1.0
    if v == 1:
        return float(min(p - stage, num_microbatches))
    warmup = (p - stage - 1) * 2 + (v - 1) * p
    chunks = min(warmup + 1, num_microbatches * v)
    return chunks / v


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------

def _stage_memory(model: ModelConfig, parallel: ParallelConfig, data_parallel: int, shape: TrainingShape,
                  stage: int,
                  precision: Precision, profile: KernelProfile, framework_overhead: float,
                  fragmentation: float, fsdp: bool = False) -> MemoryEstimate:
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    notes: list[str] = []
    x = _dims(model, parallel, shape, precision)
    e = x.e
    n_params = stage_parameters(model, parallel, stage)

    # Model states. Megatron's distributed optimizer shards the fp32 master weights and
    # both Adam moments over the data-parallel ranks *including* the CP ranks (they hold
    # the same weights); the gradient buffer is full size on every rank (it is reduced
    # in place, bucket by bucket). Rajbhandari et al. (ZeRO, 2020) call this stage 1.
    shard = data_parallel * cp if parallel.distributed_optimizer or fsdp else 1
    weights = precision.param_bytes * n_params
    gradients = precision.grad_bytes * n_params
    optimizer_states = (precision.master_bytes + precision.optimizer_bytes) * n_params / shard
    if fsdp:
        # Fully sharded data parallel (ZeRO-3: Megatron FSDP, PyTorch FSDP): weights and
        # gradients are sharded like the optimizer states; the layer being computed and the
        # next one (prefetched) are gathered whole, and one layer's gradients exist whole
        # until reduce-scattered.
        layer = sum(layer_parameters(model, tp).values())
        weights = weights / shard + 2 * precision.param_bytes * layer
        gradients = gradients / shard + precision.grad_bytes * layer
        notes.append(f"fully sharded: weights and gradients over {shard} data-parallel ranks")
    if precision.fp8 and not precision.fp8_params:
        # Transformer Engine caches an FP8 copy of every linear weight and, for the backward
        # GEMMs on Hopper, its transpose: 2 bytes per weight on top of the bf16 ones. Read
        # from TE's Linear (its weight workspace), not yet measured on a GPU. With FP8
        # parameters the two FP8 tensors are the weights (2 bytes, as bf16): nothing extra.
        linear = sum(v for k, v in layer_parameters(model, tp).items() if k != "norms")
        weights += 2 * linear * (2 if fsdp else model.num_layers // pp)  # FSDP: the gathered layers only
        notes.append("FP8 weight copies: 2 bytes per linear weight (a source-read estimate, not measured)")

    layers = model.num_layers // pp
    selective = shape.recompute == "selective"
    per_layer_bytes = sum(layer_activations(x, profile, precision, recompute_attention=selective).values())
    full_layer_bytes = sum(layer_activations(x, profile, precision).values())
    in_flight = microbatches_in_flight(parallel, shape.num_microbatches, stage)

    if shape.recompute == "full":
        # Full recomputation (Korthikanti section 5, Megatron's "uniform" method): only the
        # input of each group of recompute_num_layers layers is saved ([s/sp, b, h]); during
        # the backward pass one group's activations are rebuilt.
        group = max(1, shape.recompute_num_layers)
        saved = in_flight * math.ceil(layers / group) * e * x.sbh / x.sp
        rebuilt = min(group, layers) * full_layer_bytes
        notes.append(f"full recomputation: {math.ceil(layers / group)} checkpointed group(s) of {group} layer(s)")
    else:
        saved = in_flight * layers * per_layer_bytes
        rebuilt = 0.0
        if selective:
            notes.append("selective recomputation of core attention")
    if pp > 1 and stage < pp - 1 and not shape.deallocate_pipeline_outputs:
        # Each in-flight micro-batch's stage output [s/sp, b, h] stays referenced until its
        # backward.
        saved += in_flight * e * x.sbh / x.sp

    # The peak is the largest of three moments; the breakdown is the one at that moment.
    #   1. the backward pass of the last layer's core attention;
    #   2. the loss and the output layer's backward (last stage only);
    #   3. a layer's backward (its gradients; with full recomputation, its rebuilt group).
    vocab = model.padded_vocab_size(tp) // tp
    last_layer = layer_activations(x, profile, precision, recompute_attention=selective)
    if shape.recompute == "full":
        # The rebuilt group is saved like a layer without recomputation.
        last_layer = layer_activations(x, profile, precision)
    # With selective recomputation the last layer's core attention is rebuilt for its
    # backward: the terms layer_activations drops for it are alive again.
    rebuilt_attention = full_layer_bytes - per_layer_bytes if selective else 0.0
    attention_moment = rebuilt + attention_backward_moment(x, profile, last_layer, rebuilt_attention)
    backward_moment = rebuilt + layer_backward_transient(x, profile, precision)
    loss_moment = -1.0
    logits_and_loss = 0.0
    final_norm = 0.0
    if stage == pp - 1:
        final_norm = e * x.sbh / x.sp * (2 if profile.fused_norm else 3)
        if shape.loss_chunk_tokens:
            # Chunked cross entropy: logits are made, reduced to a loss and turned into
            # their gradient chunk by chunk (recomputed in backward), so only one chunk's
            # logits (e bytes), fp32 softmax and gradient (e bytes) exist at a time.
            tokens = min(shape.loss_chunk_tokens, x.s * x.b)
            logits_and_loss = tokens * vocab * (2 * e + 4)
            notes.append(f"chunked cross entropy, {tokens} tokens per chunk")
        else:
            # Megatron's vocab_parallel_cross_entropy: logits [s, b, V/t] in e bytes, cast to
            # fp32 (the same tensor when e = 4), softmax computed in place and saved.
            logits_and_loss = x.s * x.b * vocab * (4 + (e if e != 4 else 0))
        # Output-layer backward: the gradient of its input (full sequence) and its weight
        # gradient before it reaches the fp32 buffer.
        logits_and_loss += e * x.sbh + precision.param_bytes * vocab * x.h
        loss_moment = final_norm + logits_and_loss
    moment = max(attention_moment, backward_moment, loss_moment)
    if moment == loss_moment:
        activations = saved + final_norm
        notes.append("peak at the loss / output-layer backward")
    else:
        activations = saved + moment
        logits_and_loss = 0.0
        notes.append("peak inside a layer's " + ("attention" if moment == attention_moment else "backward"))

    # Communication and workspace buffers.
    buffers = 0.0
    if x.sp > 1:
        # Megatron's global memory buffer for the sequence-parallel all-gather, [s, b, h].
        buffers += e * x.sbh
    if cp > 1:
        # Ring attention: K/V blocks being sent and received ([s, b, 2 g d / t] each way,
        # double-buffered), and their gradients on the way back.
        buffers += 2 * 2 * e * x.s * x.b * 2 * x.g * x.d / tp
    if pp > 1:
        # Send/receive buffers of the pipeline schedule, [s/sp, b, h] each way.
        buffers += 2 * e * x.sbh / x.sp

    optimizer_step_extra = 0.0
    if not profile.fused_optimizer:
        # torch's single-tensor AdamW makes sqrt(v) and its scaled copy, one parameter at a
        # time; this happens after the backward pass, when the activations are gone.
        optimizer_step_extra = 2 * 4 * largest_parameter(model, tp) / shard
    if optimizer_step_extra > activations + logits_and_loss:
        notes.append("peak in the optimizer step")
        activations, logits_and_loss = optimizer_step_extra, 0.0

    estimate = MemoryEstimate(
        weights=weights, gradients=gradients, optimizer_states=optimizer_states,
        activations=activations, logits_and_loss=logits_and_loss, communication_buffers=buffers,
        framework_overhead=0.0, pipeline_stage=stage, notes=notes,
    )
    estimate.framework_overhead = framework_overhead + fragmentation * estimate.total
    return estimate


def estimate(model: ModelConfig, parallel: ParallelConfig, shape: TrainingShape, *, world_size: int,
             precision: Precision = BF16, profile: KernelProfile = GPU_TE,
             framework_overhead_bytes: float = 0.0, fragmentation: float = 0.0, fsdp: bool = False) -> MemoryEstimate:
    """Peak memory of the busiest GPU for one training step of ``model`` at ``parallel``.

    ``model`` must be resolved (``megalong.model.presets.resolve``). Every pipeline stage is
    estimated (the first holds the most micro-batches, the last the logits); the largest
    is returned.
    """
    parallel.validate(world_size)
    data_parallel = parallel.data_parallel_size(world_size)
    stages = [
        _stage_memory(model, parallel, data_parallel, shape, stage, precision, profile,
                      framework_overhead_bytes, fragmentation, fsdp)
        for stage in range(parallel.pipeline_parallel)
    ]
    return max(stages, key=lambda est: est.total)
