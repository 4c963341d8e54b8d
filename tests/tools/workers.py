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
