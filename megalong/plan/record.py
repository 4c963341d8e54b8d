"""A plan as plain data: what ``megalong plan --json`` prints, for scripts.

One object per layout: the layout, whether it is valid and fits, memory per GPU by part
(GB), step time by part (s), tokens/s per GPU and MFU; plus the request and the count of
rejected layouts by reason.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

from megalong.plan.memory import GB
from megalong.plan.planner import Candidate, Layout, PlanRequest, PlanResult, Rejection
from megalong.plan.summary import rejection_counts


def layout_record(layout: Layout) -> dict:
    return {
        "tp": layout.tensor_parallel, "pp": layout.pipeline_parallel, "vp": layout.virtual_pipeline,
        "cp": layout.context_parallel, "dp": layout.data_parallel, "mbs": layout.micro_batch,
        "recompute": layout.recompute, "distributed_optimizer": layout.distributed_optimizer,
        "precision": layout.precision,
    }


def candidate_record(candidate: Candidate, request: PlanRequest, role: str, rank: Optional[int] = None) -> dict:
    memory, time = candidate.memory, candidate.time
    tokens = request.global_batch * request.seq_length
    return {
        "role": role, "rank": rank, "layout": layout_record(candidate.layout), "valid": True, "reason": None,
        "fits": candidate.fits,
        "memory_gb": {"total": memory.total / GB, **{k: v / GB for k, v in memory.breakdown().items()},
                      "pipeline_stage": memory.pipeline_stage},
        "step_time_s": {"total": time.total_s, **time.breakdown()},
        "tokens_per_s_per_gpu": time.tokens_per_s_per_gpu(tokens, request.world_size),
        "mfu": time.mfu(request.gpu, request.world_size),
        "notes": list(memory.notes),
        "overrides": candidate.layout.overrides(),
    }


def rejection_record(rejection: Rejection) -> dict:
    memory = rejection.memory
    return {
        "role": "rejected", "rank": None, "layout": layout_record(rejection.layout),
        "valid": rejection.kind != "invalid", "kind": rejection.kind, "reason": rejection.reason,
        "fits": rejection.kind == "slower",
        "memory_gb": ({"total": memory.total / GB, **{k: v / GB for k, v in memory.breakdown().items()}}
                      if memory else None),
        "step_time_s": {"total": rejection.step_time_s} if rejection.step_time_s is not None else None,
    }


def plan_record(result: PlanResult, top: int, show_rejected: bool = False, rejected: list[Rejection] = ()) -> dict:
    request = result.request
    layouts = []
    if result.recipe is not None:
        if result.recipe.candidate is not None:
            layouts.append(candidate_record(result.recipe.candidate, request, "recipe"))
        else:
            layouts.append({"role": "recipe", "rank": None, "layout": layout_record(result.recipe.layout),
                            "valid": False, "reason": result.recipe.invalid, "fits": False})
    for rank, candidate in enumerate(result.candidates[:top], 1):
        layouts.append(candidate_record(candidate, request, "best", rank))
    if show_rejected:
        layouts.extend(rejection_record(r) for r in rejected)
    model = request.model
    return {
        "request": {
            "model": model.preset or "custom", "num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "seq_length": request.seq_length, "global_batch": request.global_batch, "nodes": request.nodes,
            "gpus_per_node": request.gpus_per_node, "gpu": request.gpu.name, "gpu_memory_gb": request.gpu.memory_gb,
            "memory_headroom": request.memory_headroom, "loss_chunk_tokens": request.loss_chunk_tokens,
            "pinned": request.pin.describe(), "stack": asdict(request.stack),
            "attention_work": request.workload.describe(),
            "efficiency": asdict(request.efficiency),
        },
        "fitting_layouts": len(result.candidates),
        "layouts": layouts,
        "rejections": {"total": len(rejected), "by_reason": dict(rejection_counts(rejected))},
    }
