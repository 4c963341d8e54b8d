"""Enumerate parallel layouts, reject the invalid and the too large, rank the rest.

A layout is TP x PP (x virtual stages) x CP x DP plus micro-batch size, recomputation,
distributed optimizer and precision. Validity rules (each rejection names the rule):

* TP divides the GPUs of a node (tensor parallelism is kept on NVLink) and the attention
  heads, the KV heads and the FFN width (``ModelConfig.validate``);
* PP x virtual stages divides the layers; interleaving needs PP > 1 and a number of
  micro-batches divisible by PP (Megatron-Core's interleaved schedule);
* CP > 1 needs the sequence length divisible by 2 x CP (the load-balanced chunking), and
  sequence parallelism the share of each CP rank divisible by TP;
* TP x PP x CP divides the world; the global batch is divisible by DP x micro-batch;
* FP8 needs a GPU with FP8 tensor cores. Sequence parallelism is on whenever TP > 1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from megalong.config.parallel import LayoutError, ParallelConfig
from megalong.model.config import ModelConfig
from megalong.plan.hardware import GpuSpec
from megalong.plan.memory import BF16, FP8, GB, GPU_TE, KernelProfile, MemoryEstimate, Precision, TrainingShape, \
    estimate
from megalong.plan.step_time import StepTime, estimate_step_time


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int
    virtual_pipeline: Optional[int]
    micro_batch: int
    recompute: Optional[str]
    distributed_optimizer: bool
    precision: str

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel,
            virtual_pipeline=self.virtual_pipeline, context_parallel=self.context_parallel,
            sequence_parallel=self.tensor_parallel > 1, distributed_optimizer=self.distributed_optimizer,
        )

    def family(self) -> str:
        """The parallel degrees alone: layouts that differ only in micro-batch, recomputation,
        optimizer sharding or precision belong to one family."""
        vp = f"x{self.virtual_pipeline}" if self.virtual_pipeline else ""
        return (f"TP={self.tensor_parallel} PP={self.pipeline_parallel}{vp} CP={self.context_parallel} "
                f"DP={self.data_parallel}")

    def describe(self) -> str:
        return (f"{self.family()} mb={self.micro_batch} recompute={self.recompute or 'none'} "
                f"{'dist-opt' if self.distributed_optimizer else 'replicated-opt'} {self.precision}")

    def overrides(self) -> list[str]:
        """The recipe overrides that select this layout (``megalong train RECIPE ...``)."""
        out = [
            f"parallel.tensor_parallel={self.tensor_parallel}",
            f"parallel.pipeline_parallel={self.pipeline_parallel}",
            f"parallel.context_parallel={self.context_parallel}",
            f"parallel.sequence_parallel={str(self.tensor_parallel > 1).lower()}",
            f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"model.recompute={self.recompute or 'null'}",
        ]
        if self.virtual_pipeline:
            out.append(f"parallel.virtual_pipeline={self.virtual_pipeline}")
        return out


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool


# Why a layout was not proposed: it breaks a validity rule, it does not fit in memory, or it
# fits but another layout is faster.
RejectionKind = Literal["invalid", "too_large", "slower"]


@dataclass
class Rejection:
    layout: Layout
    kind: RejectionKind
    reason: str
    memory: Optional[MemoryEstimate] = None
    step_time_s: Optional[float] = None  # for layouts that fit but are slower


@dataclass
class PlanRequest:
    model: ModelConfig  # resolved
    seq_length: int
    global_batch: int  # sequences per step
    nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    loss_chunk_tokens: Optional[int] = None
    precisions: tuple[str, ...] = ("bf16", "fp8")
    recompute_options: tuple[Optional[str], ...] = (None, "selective", "full")
    micro_batches: tuple[int, ...] = (1, 2, 4)
    distributed_optimizer_options: tuple[bool, ...] = (True, False)
    # Keep this share of GPU memory free (allocator spikes, NCCL growth).
    memory_headroom: float = 0.05
    profile: KernelProfile = GPU_TE

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class PlanResult:
    request: PlanRequest
    candidates: list[Candidate]  # fitting layouts, fastest first
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def best(self) -> Optional[Candidate]:
        return self.candidates[0] if self.candidates else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _precision(name: str) -> Precision:
    return FP8 if name == "fp8" else BF16


def check_layout(layout: Layout, request: PlanRequest) -> Optional[str]:
    """Why ``layout`` cannot run, or None when it can."""
    model, world = request.model, request.world_size
    tp, pp, cp = layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel
    if request.gpus_per_node % tp:
        return f"TP={tp} does not divide the {request.gpus_per_node} GPUs of a node (TP stays on NVLink)"
    try:
        model.validate(tp, pp, cp)
    except LayoutError as err:
        return str(err)
    if tp * pp * cp * layout.data_parallel != world:
        return f"TP x PP x CP x DP = {tp * pp * cp * layout.data_parallel} is not the {world} GPUs"
    if layout.virtual_pipeline:
        if pp < 2:
            return "virtual pipeline stages need PP > 1"
        if model.num_layers % (pp * layout.virtual_pipeline):
            return (f"{model.num_layers} layers are not divisible by PP x virtual = "
                    f"{pp} x {layout.virtual_pipeline}")
    if cp > 1 and request.seq_length % (2 * cp):
        return f"sequence length {request.seq_length} is not divisible by 2 x CP = {2 * cp}"
    if tp > 1 and (request.seq_length // cp) % tp:
        return (f"the {request.seq_length // cp}-token sequence share of a CP rank is not divisible by "
                f"TP={tp} (sequence parallelism splits it)")
    per_step = layout.data_parallel * layout.micro_batch
    if request.global_batch % per_step:
        return (f"global batch {request.global_batch} is not divisible by DP x micro-batch = "
                f"{layout.data_parallel} x {layout.micro_batch}")
    microbatches = request.global_batch // per_step
    if layout.virtual_pipeline and microbatches % pp:
        return f"interleaved pipeline needs micro-batches ({microbatches}) divisible by PP={pp}"
    if layout.precision == "fp8" and not request.gpu.fp8_tflops:
        return f"{request.gpu.name} has no FP8 tensor cores"
    if not layout.distributed_optimizer and layout.data_parallel * cp == 1:
        return "duplicate: without DP or CP ranks the distributed optimizer shards nothing"
    return None


def enumerate_layouts(request: PlanRequest) -> Iterable[Layout]:
    world = request.world_size
    for tp, pp, cp in itertools.product(_divisors(world), repeat=3):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        virtuals = [None] + ([v for v in (2, 4, 8)] if pp > 1 else [])
        for vp, mb, recompute, dist_opt, precision in itertools.product(
            virtuals, request.micro_batches, request.recompute_options,
            request.distributed_optimizer_options, request.precisions,
        ):
            yield Layout(tp, pp, cp, dp, vp, mb, recompute, dist_opt, precision)


def evaluate(layout: Layout, request: PlanRequest) -> Candidate:
    """Memory and step time of one valid layout."""
    parallel = layout.parallel_config()
    precision = _precision(layout.precision)
    shape = TrainingShape(
        seq_length=request.seq_length, micro_batch=layout.micro_batch,
        num_microbatches=request.global_batch // (layout.data_parallel * layout.micro_batch),
        recompute=layout.recompute, loss_chunk_tokens=request.loss_chunk_tokens,
    )
    memory = estimate(request.model, parallel, shape, world_size=request.world_size, precision=precision,
                      profile=request.profile, framework_overhead_bytes=request.gpu.framework_overhead_gb * GB,
                      fragmentation=request.gpu.fragmentation)
    time = estimate_step_time(request.model, parallel, shape, world_size=request.world_size,
                              gpus_per_node=request.gpus_per_node, gpu=request.gpu, precision=precision)
    usable = request.gpu.memory_gb * GB * (1 - request.memory_headroom)
    return Candidate(layout=layout, memory=memory, time=time, fits=memory.total <= usable)


def plan(request: PlanRequest) -> PlanResult:
    """Every layout for ``request``: those that fit, fastest first, and why the rest do not."""
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    usable = request.gpu.memory_gb * (1 - request.memory_headroom)
    for layout in enumerate_layouts(request):
        reason = check_layout(layout, request)
        if reason is not None:
            rejections.append(Rejection(layout, "invalid", f"invalid: {reason}"))
            continue
        candidate = evaluate(layout, request)
        if candidate.fits:
            candidates.append(candidate)
        else:
            rejections.append(Rejection(
                layout, "too_large",
                f"does not fit: needs {candidate.memory.total / GB:.1f} GB > {usable:.1f} GB usable", candidate.memory,
            ))
    # Fastest first; on a tie, less memory, then fewer model-parallel ranks.
    candidates.sort(key=lambda c: (round(c.time.total_s, 6), c.memory.total,
                                   c.layout.tensor_parallel * c.layout.pipeline_parallel))
    best_time = candidates[0].time.total_s if candidates else None
    for candidate in candidates[1:]:
        rejections.append(Rejection(
            candidate.layout, "slower",
            f"slower: {candidate.time.total_s:.2f} s/step vs {best_time:.2f} s/step for the best",
            candidate.memory, candidate.time.total_s,
        ))
    return PlanResult(request=request, candidates=candidates, rejections=rejections)


@dataclass
class FitCheck:
    fits: bool
    memory: MemoryEstimate
    usable_bytes: float
    message: str


def check_fits(model: ModelConfig, parallel: ParallelConfig, shape: TrainingShape, *, world_size: int,
               gpu: GpuSpec, precision: str = "bf16", profile: KernelProfile = GPU_TE,
               headroom: float = 0.05) -> FitCheck:
    """Will this exact layout fit? For ``megalong train`` to warn before it starts.

    ``model`` must be resolved; ``shape.num_microbatches`` is per DP rank and step.
    """
    memory = estimate(model, parallel, shape, world_size=world_size, precision=_precision(precision),
                      profile=profile, framework_overhead_bytes=gpu.framework_overhead_gb * GB,
                      fragmentation=gpu.fragmentation)
    usable = gpu.memory_gb * GB * (1 - headroom)
    fits = memory.total <= usable
    verdict = "fits in" if fits else "does NOT fit in"
    message = (f"{parallel.describe(world_size)} at {shape.seq_length:,} tokens: predicted peak "
               f"{memory.describe()} per GPU {verdict} {usable / GB:.1f} GB usable of {gpu.memory_gb:g} GB "
               f"({gpu.name})")
    if not fits:
        message += "; run `megalong plan` for layouts that fit"
    return FitCheck(fits=fits, memory=memory, usable_bytes=usable, message=message)
