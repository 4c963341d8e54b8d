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


def _cpu_context(work_dir: str):
    """A gpu_check WorkerContext of this one CPU process (one Megatron-Core layout: no parallelism)."""
    from megalong.config.parallel import ParallelConfig
    from megalong.gpucheck.machine import detect
    from megalong.gpucheck.registry import CheckOptions
    from megalong.gpucheck.worker import WorkerContext
    from megalong.runtime import init_distributed

    runtime = init_distributed(ParallelConfig(), device="cpu")
    return WorkerContext(CheckOptions(work_dir), detect("cpu"), (), runtime.device, runtime, 0, 1, Path(work_dir))


def training_paths(work_dir: str) -> dict:
    """Both CPU tests of how the checks train, in one process: the is_first_microbatch flags
    hand-run forwards leave (:func:`flags_seen_by_hand_run_forwards`), and training.initial-weights
    with and without the fix it guards (:func:`initial_weights_check_with_and_without_the_fix`)."""
    ctx = _cpu_context(work_dir)
    return {"flags": flags_seen_by_hand_run_forwards(ctx), **initial_weights_check_with_and_without_the_fix(ctx)}


def initial_weights_check_with_and_without_the_fix(ctx) -> dict:
    """training.initial-weights on the CPU (bf16, distributed optimizer), then again with the fix
    of megalong.training.checkpoint.load_checkpoint reverted: every Megatron-Core optimizer's
    ``reload_model_params`` (the refresh of its fp32 master weights after a weights-only load)
    made a no-op, as megalong was before it called it. Leaves them so: call it last."""
    from megatron.core.optimizer import MegatronOptimizer

    from megalong.gpucheck.checks import initial_weights

    found = {}
    result = initial_weights.check_initial_weights(ctx)
    found["fixed"] = {"status": result.status, "reason": result.reason, "figures": result.figures}

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in [MegatronOptimizer, *subclasses(MegatronOptimizer)]:
        if "reload_model_params" in vars(cls):
            cls.reload_model_params = lambda self, *args, **kwargs: None
    result = initial_weights.check_initial_weights(ctx)
    found["reverted"] = {"status": result.status, "reason": result.reason}
    return found


def flags_seen_by_hand_run_forwards(ctx) -> list:
    """What a Transformer Engine linear would see of ``is_first_microbatch`` in each forward
    gpu_check runs by hand (runs.logits, runs.loss_and_backward, training.mean_loss), twice
    each. TE's linears set the flag to False after every call and then reuse their cached FP8
    weights; only Megatron-Core's ``set_is_first_microbatch`` (what its schedule calls before a
    step) sets it again. A module with the flag stands in for such a linear; ``config.fp8`` is
    set so that ``set_is_first_microbatch`` acts (without Transformer Engine, Megatron-Core's
    FP8 context is a no-op and the local layers run as before)."""
    import torch

    from megalong.gpucheck import cases, runs, training

    config = cases.model_config(cases.MODEL, transformer_impl="local", params_dtype="fp32", attention_backend="sdpa")
    model = runs.build(config, ctx)[0]
    layer = model.decoder.layers[0]
    layer.te_linear_flag = torch.nn.Module()
    layer.te_linear_flag.is_first_microbatch = False  # as after a first call
    seen = []

    def like_a_te_linear(module, args):
        seen.append(layer.te_linear_flag.is_first_microbatch)
        layer.te_linear_flag.is_first_microbatch = False

    layer.register_forward_pre_hook(like_a_te_linear)
    model.config.fp8 = "hybrid"
    batch = runs.micro_batch(cases.synthetic_samples([[100, 28]], config.vocab_size, seed=1), ctx)
    tokens = torch.arange(16) % config.vocab_size
    for _ in range(2):
        runs.logits(model, tokens, config.vocab_size)
        runs.loss_and_backward(model, batch)
        training.mean_loss(model, [batch])
    return seen
