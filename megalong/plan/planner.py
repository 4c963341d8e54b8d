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

A ``LayoutPin`` (``megalong plan --layout``) fixes some of the dimensions; the rest are
searched as usual. The recipe's own layout, when given, is evaluated and reported beside the
best ones.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from megalong.config.parallel import LayoutError, ParallelConfig
from megalong.model.config import ModelConfig
from megalong.plan.efficiency import Efficiency, efficiency_for
from megalong.plan.hardware import GpuSpec
from megalong.plan.memory import BF16, FP8, GB, GPU_TE, KernelProfile, MemoryEstimate, Precision, TrainingShape, \
    estimate
from megalong.plan.pin import LayoutPin
from megalong.plan.stack import MEGALONG, Stack
from megalong.plan.step_time import StepTime, estimate_step_time
from megalong.plan.workload import Workload


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
    rule: str = ""  # the reason without its numbers, for counting (summary.rejection_counts)


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
    pin: LayoutPin = field(default_factory=LayoutPin)
    stack: Stack = MEGALONG
    # The samples' attention work (None: one full-length document per sample).
    workload: Optional[Workload] = None
    efficiency: Optional[Efficiency] = None  # None: the GPU generation's calibrated constants
    # The recipe's own layout, evaluated and reported beside the best (``megalong plan RECIPE``).
    recipe_layout: Optional[Layout] = None

    def __post_init__(self):
        if self.workload is None:
            self.workload = Workload.full_sequences(self.seq_length, self.global_batch)
        if self.efficiency is None:
            self.efficiency = efficiency_for(self.gpu)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def precision(self, name: str) -> Precision:
        base = FP8 if name == "fp8" else BF16
        return base.for_stack(self.stack.grad_reduce_in_fp32, self.stack.fp8_param_gather)


@dataclass
class RecipeOutcome:
    """The recipe's own layout: why it cannot run (``invalid``), or its evaluation."""

    layout: Layout
    invalid: Optional[str] = None
    candidate: Optional[Candidate] = None


@dataclass
class PlanResult:
    request: PlanRequest
    candidates: list[Candidate]  # fitting layouts, fastest first
    rejections: list[Rejection] = field(default_factory=list)
    recipe: Optional[RecipeOutcome] = None

    @property
    def best(self) -> Optional[Candidate]:
        return self.candidates[0] if self.candidates else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _problem(layout: Layout, request: PlanRequest) -> Optional[tuple[str, str]]:
    """(rule, message) for the first rule ``layout`` breaks, or None when it can run."""
    model, world = request.model, request.world_size
    tp, pp, cp = layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel
    if request.gpus_per_node % tp:
        return ("TP must divide the GPUs of a node",
                f"TP={tp} does not divide the {request.gpus_per_node} GPUs of a node (TP stays on NVLink)")
    try:
        model.validate(tp, pp, cp)
    except LayoutError as err:
        return "the model's heads, KV heads, FFN or layers do not split over TP/PP", str(err)
    if world % (tp * pp * cp):
        return ("TP x PP x CP must divide the GPUs", f"TP x PP x CP = {tp * pp * cp} does not divide the {world} GPUs")
    if tp * pp * cp * layout.data_parallel != world:
        return ("TP x PP x CP x DP must be all GPUs",
                f"TP x PP x CP x DP = {tp * pp * cp * layout.data_parallel} is not the {world} GPUs")
    if layout.virtual_pipeline:
        if pp < 2:
            return "virtual stages need PP > 1", "virtual pipeline stages need PP > 1"
        if model.num_layers % (pp * layout.virtual_pipeline):
            return ("layers must divide by PP x virtual stages",
                    f"{model.num_layers} layers are not divisible by PP x virtual = {pp} x {layout.virtual_pipeline}")
    if cp > 1 and request.seq_length % (2 * cp):
        return ("the sequence must divide by 2 x CP",
                f"sequence length {request.seq_length} is not divisible by 2 x CP = {2 * cp}")
    if tp > 1 and (request.seq_length // cp) % tp:
        return ("a CP rank's share must divide by TP",
                f"the {request.seq_length // cp}-token sequence share of a CP rank is not divisible by "
                f"TP={tp} (sequence parallelism splits it)")
    per_step = layout.data_parallel * layout.micro_batch
    if request.global_batch % per_step:
        return ("the global batch must divide by DP x micro-batch",
                f"global batch {request.global_batch} is not divisible by DP x micro-batch = "
                f"{layout.data_parallel} x {layout.micro_batch}")
    microbatches = request.global_batch // per_step
    if layout.virtual_pipeline and microbatches % pp:
        return ("interleaving needs micro-batches divisible by PP",
                f"interleaved pipeline needs micro-batches ({microbatches}) divisible by PP={pp}")
    if layout.precision == "fp8" and not request.gpu.fp8_tflops:
        return "FP8 needs FP8 tensor cores", f"{request.gpu.name} has no FP8 tensor cores"
    if not layout.distributed_optimizer and layout.data_parallel * cp == 1:
        return ("duplicate of the distributed-optimizer layout",
                "duplicate: without DP or CP ranks the distributed optimizer shards nothing")
    return None


def check_layout(layout: Layout, request: PlanRequest) -> Optional[str]:
    """Why ``layout`` cannot run, or None when it can."""
    problem = _problem(layout, request)
    return problem[1] if problem else None


def enumerate_layouts(request: PlanRequest) -> Iterable[Layout]:
    """Every combination of the dimensions, the pinned ones (``request.pin``) held fixed."""
    world, pin = request.world_size, request.pin
    for tp, pp, cp in itertools.product(*(pin.choices(name, _divisors(world)) for name in ("tp", "pp", "cp"))):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        if pin.dp is not None and pin.dp != dp:
            continue
        virtuals = pin.choices("vp", [None] + ([2, 4, 8] if pp > 1 else []))
        for vp, mb, recompute, dist_opt, precision in itertools.product(
            virtuals, pin.choices("mbs", request.micro_batches), pin.choices("recompute", request.recompute_options),
            pin.choices("distributed_optimizer", request.distributed_optimizer_options),
            pin.choices("precision", request.precisions),
        ):
            yield Layout(tp, pp, cp, dp, vp, mb, recompute, dist_opt, precision)


def _shape(layout: Layout, request: PlanRequest) -> TrainingShape:
    return TrainingShape(
        seq_length=request.seq_length, micro_batch=layout.micro_batch,
        num_microbatches=request.global_batch // (layout.data_parallel * layout.micro_batch),
        recompute=layout.recompute, loss_chunk_tokens=request.loss_chunk_tokens,
        deallocate_pipeline_outputs=request.stack.deallocate_pipeline_outputs,
    )


def step_time(layout: Layout, request: PlanRequest) -> StepTime:
    """Step time of one valid layout (the part of :func:`evaluate` that the calibration redoes
    for every trial of its constants; memory does not depend on them)."""
    return estimate_step_time(request.model, layout.parallel_config(), _shape(layout, request),
                              world_size=request.world_size, gpus_per_node=request.gpus_per_node, gpu=request.gpu,
                              precision=request.precision(layout.precision), efficiency=request.efficiency,
                              stack=request.stack, workload=request.workload)


def evaluate(layout: Layout, request: PlanRequest) -> Candidate:
    """Memory and step time of one valid layout."""
    memory = estimate(request.model, layout.parallel_config(), _shape(layout, request), world_size=request.world_size,
                      precision=request.precision(layout.precision),
                      profile=dataclasses.replace(request.profile, fused_rope=request.stack.fused_rope),
                      framework_overhead_bytes=request.gpu.framework_overhead_gb * GB,
                      fragmentation=0.0 if request.stack.expandable_segments else request.gpu.fragmentation,
                      fsdp=request.stack.fsdp)
    usable = request.gpu.memory_gb * GB * (1 - request.memory_headroom)
    return Candidate(layout=layout, memory=memory, time=step_time(layout, request), fits=memory.total <= usable)


def plan(request: PlanRequest) -> PlanResult:
    """Every layout for ``request``: those that fit, fastest first, and why the rest do not."""
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    usable = request.gpu.memory_gb * (1 - request.memory_headroom)
    for layout in enumerate_layouts(request):
        problem = _problem(layout, request)
        if problem is not None:
            rejections.append(Rejection(layout, "invalid", f"invalid: {problem[1]}", rule=problem[0]))
            continue
        candidate = evaluate(layout, request)
        if candidate.fits:
            candidates.append(candidate)
        else:
            rejections.append(Rejection(
                layout, "too_large",
                f"does not fit: needs {candidate.memory.total / GB:.1f} GB > {usable:.1f} GB usable", candidate.memory,
                rule="does not fit in memory",
            ))
    # Fastest first; on a tie, less memory, then fewer model-parallel ranks.
    candidates.sort(key=lambda c: (round(c.time.total_s, 6), c.memory.total,
                                   c.layout.tensor_parallel * c.layout.pipeline_parallel))
    best_time = candidates[0].time.total_s if candidates else None
    for candidate in candidates[1:]:
        rejections.append(Rejection(
            candidate.layout, "slower",
            f"slower: {candidate.time.total_s:.2f} s/step vs {best_time:.2f} s/step for the best",
            candidate.memory, candidate.time.total_s, rule="fits, but slower",
        ))
    return PlanResult(request=request, candidates=candidates, rejections=rejections, recipe=_recipe_outcome(request))


def _recipe_outcome(request: PlanRequest) -> Optional[RecipeOutcome]:
    layout = request.recipe_layout
    if layout is None:
        return None
    problem = _problem(layout, request)
    if problem is not None:
        return RecipeOutcome(layout, invalid=problem[1])
    return RecipeOutcome(layout, candidate=evaluate(layout, request))


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
    # megalong's own stack: fp32 gradient buffer, bf16 weights with FP8 copies (megalong.plan.stack).
    memory = estimate(model, parallel, shape, world_size=world_size, precision=FP8 if precision == "fp8" else BF16,
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
