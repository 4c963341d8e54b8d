"""The planner held against published measured runs, and the fit of its constants.

For each published run (megalong.plan.published) the planner gets the run's model, sequence,
batch, GPU and precision, and its layout pinned (``LayoutPin``: the dimensions the source
gives); it searches what the source leaves out (micro-batch, recomputation) and predicts the
fastest layout that fits, exactly as ``megalong plan --layout`` does. Runs of Megatron-based
stacks use that stack's switches (stack.NEMO_PERFORMANCE) and full-length causal sequences;
other frameworks' runs (torchtitan, ProLong) are predicted as megalong would run them, for
comparison only.

:func:`fit` finds the efficiency constants (megalong.plan.efficiency) that minimise the sum
of squared log(predicted / measured) over the runs it is given, by coordinate descent with a
golden-section search per constant in log space: five smooth-enough constants, and a few
hundred planner evaluations; no optimisation library is a dependency of megalong, and this
small search needs none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

from megalong.plan.efficiency import EFFICIENCY, Efficiency
from megalong.plan.hardware import Generation, gpu_spec
from megalong.plan.pin import LayoutPin
from megalong.plan.planner import Candidate, PlanRequest, evaluate, plan, step_time
from megalong.plan.published import PublishedRun, PublishedTable
from megalong.plan.stack import MEGALONG, NEMO_PERFORMANCE
from megalong.plan.workload import Workload

GPUS_PER_NODE = 8
# megalong's bundled mixture for a ProLong run's sequence length (document-masked rows).
PROLONG_MIXTURES = {65536: "prolong_stage1_64k", 524288: "prolong_stage2_512k"}


@dataclass
class Prediction:
    run: PublishedRun
    measured: float  # tokens/s per GPU
    request: PlanRequest
    fitting: list[Candidate]  # layouts that fit, any order
    smallest: Optional[Candidate]  # the smallest valid layout (for the memory verdict)

    @property
    def fits(self) -> bool:
        return bool(self.fitting)

    def best(self, efficiency: Optional[dict[Generation, Efficiency]] = None) -> Optional[tuple[Candidate, float]]:
        """(layout, tokens/s per GPU) of the fastest fitting layout, with ``efficiency``
        instead of the request's constants when given."""
        if not self.fitting:
            return None
        request = self.request
        if efficiency is not None:
            request = replace(request, efficiency=efficiency[request.gpu.generation])
        tokens = request.global_batch * request.seq_length
        timed = [(c, tokens / step_time(c.layout, request).total_s / request.world_size) for c in self.fitting]
        return max(timed, key=lambda item: item[1])

    def ratio(self, efficiency: Optional[dict[Generation, Efficiency]] = None) -> Optional[float]:
        best = self.best(efficiency)
        return best[1] / self.measured if best else None


def request_for(run: PublishedRun, table: PublishedTable) -> PlanRequest:
    """The planner's request for ``run``: its layout pinned where the source gives it."""
    framework = table.source(run).framework
    model = table.model(run)
    if run.document_masking:
        from megalong.data.config import DataConfig

        data = DataConfig(mixture=PROLONG_MIXTURES[run.seq_length], seq_length=run.seq_length)
        workload = Workload.from_data(data, run.global_batch)
    else:
        workload = Workload.full_sequences(run.seq_length, run.global_batch)
    if run.has_layout:
        world = run.world_size
        # vp None is "not interleaved" (pinned); recomputation is searched unless published.
        published = {"recompute": run.recompute} if run.recompute else {}
        pin = LayoutPin(tp=run.tp, pp=run.pp, cp=run.cp, dp=run.dp, vp=run.vp, mbs=run.mbs,
                        distributed_optimizer=True, precision=run.precision, **published)
    else:  # a whole run's cost without its layout: megalong's best layout on one node
        world = GPUS_PER_NODE
        pin = LayoutPin(precision=run.precision)
    return PlanRequest(
        model=model, seq_length=run.seq_length, global_batch=run.global_batch,
        nodes=max(1, world // GPUS_PER_NODE), gpus_per_node=min(world, GPUS_PER_NODE),
        gpu=gpu_spec(run.gpu, run.gpu_memory_gb), loss_chunk_tokens=None if framework == "megatron" else 8192,
        precisions=(run.precision,), pin=pin, workload=workload,
        stack=(NEMO_PERFORMANCE if framework == "megatron" else MEGALONG).with_(fsdp=run.fsdp and run.has_layout),
        # The question for a layout that ran is whether it fits the GPU, not whether to leave
        # a margin for a new run (megalong's own choice, for a run published without layout, does).
        memory_headroom=0.0 if run.has_layout else PlanRequest.memory_headroom,
    )


def predict(run: PublishedRun, table: PublishedTable) -> Prediction:
    """The planner's view of ``run``. For other frameworks' runs at their published layout
    memory is not judged (their stacks keep other tensors): every valid layout counts. A run
    published without its layout gets megalong's fastest layout that fits."""
    request = request_for(run, table)
    result = plan(request)
    too_large = [evaluate(r.layout, request) for r in result.rejections if r.kind == "too_large"]
    smallest = min(result.candidates + too_large, key=lambda c: c.memory.total, default=None)
    fitting = result.candidates
    if table.source(run).framework != "megatron" and run.has_layout:
        fitting = fitting + too_large
    return Prediction(run=run, measured=table.measured_tokens_per_s_per_gpu(run), request=request,
                      fitting=fitting, smallest=smallest)


def log_error(predictions: list[Prediction], efficiency: dict[Generation, Efficiency]) -> float:
    """Sum over ``predictions`` of log(predicted / measured)^2; a run nothing fits counts 1."""
    total = 0.0
    for p in predictions:
        ratio = p.ratio(efficiency)
        total += math.log(ratio) ** 2 if ratio else 1.0
    return total


# The constants fit() adjusts: (generation or None for all, field).
FITTED: tuple[tuple[Optional[Generation], str], ...] = (
    ("hopper", "gemm_fp8"), ("hopper", "attention"), ("blackwell", "gemm_fp8"), ("blackwell", "attention"),
    (None, "tp_overlap"),
)


def _with(efficiency: dict[Generation, Efficiency], generation: Optional[Generation], name: str,
          value: float) -> dict[Generation, Efficiency]:
    out = dict(efficiency)
    for gen in ([generation] if generation else list(out)):
        out[gen] = replace(out[gen], **{name: value})
    return out


def _golden(cost: Callable[[float], float], low: float, high: float, steps: int = 18) -> float:
    """Minimum of a unimodal ``cost`` on [low, high], searched in log space."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(low), math.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = cost(math.exp(c)), cost(math.exp(d))
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = cost(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = cost(math.exp(d))
    return math.exp((a + b) / 2)


def fit(predictions: list[Prediction], start: Optional[dict[Generation, Efficiency]] = None,
        rounds: int = 4) -> dict[Generation, Efficiency]:
    """The constants of :data:`FITTED` that best match ``predictions`` (see the module docstring)."""
    efficiency = dict(start or EFFICIENCY)
    bounds = {"tp_overlap": (0.01, 0.99)}
    for _ in range(rounds):
        for generation, name in FITTED:
            relevant = [p for p in predictions if generation is None or p.request.gpu.generation == generation]
            if not relevant:
                continue
            low, high = bounds.get(name, (0.05, 1.0))
            value = _golden(lambda x: log_error(relevant, _with(efficiency, generation, name, x)), low, high)
            efficiency = _with(efficiency, generation, name, value)
    return efficiency


def fit_bf16_ratio(bf16: Prediction, fp8: Prediction, efficiency: dict[Generation, Efficiency],
                   generation: Generation = "hopper") -> dict[Generation, Efficiency]:
    """``gemm_bf16`` of ``generation`` such that the planner's bf16 / FP8 throughput ratio for
    two runs of one source equals the measured one (no Megatron table publishes bf16 Llama runs)."""
    measured = bf16.measured / fp8.measured

    def cost(value: float) -> float:
        trial = _with(efficiency, generation, "gemm_bf16", value)
        return math.log(bf16.best(trial)[1] / fp8.best(trial)[1] / measured) ** 2

    return _with(efficiency, generation, "gemm_bf16", _golden(cost, 0.05, 1.0))
