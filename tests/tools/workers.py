"""Functions run in spawned processes by the gpu_check tests (module-level so spawn can import them)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path


def model_check_with_and_without_documents(work_dir: str) -> dict:
    """megalong.gpucheck's whole-model comparison on the CPU: the bf16 model against the fp32
    reference, once with the document boundaries and once with them dropped (a backend that
    ignored documents)."""
    from megalong.checkpoint.weights import load_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.gpucheck import runs
    from megalong.gpucheck.checks import model_backends
    from megalong.gpucheck.compare import gradients
    from megalong.gpucheck.machine import detect
    from megalong.gpucheck.registry import CheckOptions
    from megalong.gpucheck.worker import WorkerContext
    from megalong.runtime import init_distributed

    runtime = init_distributed(ParallelConfig(), device="cpu")
    ctx = WorkerContext(CheckOptions(work_dir), detect("cpu"), (), runtime.device, runtime, 0, 1, Path(work_dir))
    reference = model_backends.reference(ctx)
    found = {}
    for documents in (True, False):
        chunks = runs.build(model_backends.candidate_config(ctx, "sdpa"), ctx, seed=99)
        load_weights(chunks, reference["weights"])
        batch = runs.micro_batch(model_backends.samples(ctx), ctx)
        if not documents:
            batch = dataclasses.replace(batch, packed_seq_params=None)
        loss = runs.loss_and_backward(chunks[0], batch)
        result = model_backends.compare_with_reference("model.sdpa", loss, gradients(chunks[0]), reference)
        found[documents] = {"status": result.status, "reason": result.reason,
                            "loss_relative_error": result.figures["loss_relative_error"]}
    return found


def first_check_then_hang(names, options, required, device_type, records_dir) -> list:
    """A group whose first check reports and whose second never ends."""
    from megalong.gpucheck.records import PASSED, CheckResult

    record = CheckResult(names[0], PASSED, "reported before the hang")
    (Path(records_dir) / f"{names[0]}.json").write_text(json.dumps(record.to_dict()), encoding="utf-8")
    time.sleep(600)
    return []


def megalong_cp_check_with_and_without_documents() -> dict:
    """cp.megalong at CP=2 over gloo on the CPU (megalong's ring and all-to-all against the
    definition), and the same comparison for a ring that ignores the document boundaries."""
    import math
    import types

    import torch
    import torch.distributed as dist

    from megalong.config.parallel import ParallelConfig
    from megalong.gpucheck import cases
    from megalong.gpucheck.checks import context_parallel
    from megalong.gpucheck.machine import detect
    from megalong.model.attention import ring
    from megalong.model.attention.layout import DocumentLayout
    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(context_parallel=2), device="cpu")
    ctx = types.SimpleNamespace(on_gpu=False, device=torch.device("cpu"), world_size=2, machine=detect("cpu"))
    result = context_parallel.check_megalong(ctx)
    seq, scale = result.figures["seq_length"], 1.0 / math.sqrt(cases.HEAD_DIM)
    one_document = DocumentLayout.from_sample_cu_seqlens([torch.tensor([0, seq])] * 2, seq)
    errors = context_parallel.kernel_errors(
        ctx, lambda q, k, v, layout: ring.ring_attention(q, k, v, one_document, dist.group.WORLD, scale), 4, 1, seq)
    failures: list = []
    context_parallel._judge_kernel("ring without documents", 4, 1, errors, 2, failures, {})
    return {"status": result.status, "reason": result.reason, "figures": result.figures,
            "without_documents": failures}
