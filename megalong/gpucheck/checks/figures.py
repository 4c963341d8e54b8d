"""Throughput figures on one GPU: a Llama-3-8B-shaped model (all its shapes, fewer layers) at 64K
tokens, trained through megalong's Trainer (Transformer Engine layers and attention, Megatron
DDP and distributed optimizer, chunked cross entropy), in bf16 and in FP8 (delayed scaling).

The layer count is the largest megalong's memory planner says fits this GPU at 64K for both
precisions (megalong.plan.memory, GPU_TE profile); if the GPU still runs out of memory, one
layer less, at most twice. Documents: packed log-normal lengths (median 2,048 tokens) after a
few one-token ones, random tokens. Reported per measured step (median of ``figures_steps``
after ``figures_warmup``): tokens/s, model TFLOP/s (megalong.training.metrics.training_flops:
attention counted from the sum of squared document lengths), MFU against the GPU's dense
BF16 peak (for FP8 too), peak allocated and reserved memory, and the planner's prediction.

These are measurements, not comparisons: the check fails when a step does not run, a loss
is not finite, or the MFU is not in (0, 100%] (above 100% the FLOP count or the timing is wrong).
"""

from __future__ import annotations

import math
import statistics

import torch

from megalong.gpucheck import cases, training
from megalong.gpucheck.records import CheckResult

LOSS_CHUNK_TOKENS = 8192
DOCUMENT_MEDIAN = 2048
MAX_RETRIES = 2


def planner_estimate(layers: int, seq_length: int, precision: str, memory_gb: float, gpu_name: str = "this GPU"):
    """megalong's planner on one GPU of ``memory_gb`` (GB of 10^9 bytes): (fits, estimate)."""
    from megalong.config.parallel import ParallelConfig
    from megalong.model import preset_config
    from megalong.plan.hardware import GpuSpec
    from megalong.plan.memory import TrainingShape
    from megalong.plan.planner import check_fits

    model = preset_config("llama3-8b", num_layers=layers, max_position_embeddings=seq_length, params_dtype="bf16")
    fit = check_fits(model, ParallelConfig(), TrainingShape(seq_length, loss_chunk_tokens=LOSS_CHUNK_TOKENS),
                     world_size=1, gpu=GpuSpec.of_memory(gpu_name, memory_gb), precision=precision)
    return fit.fits, fit.memory


def layers_that_fit(memory_gb: float, seq_length: int, most: int = 32) -> int:
    """The most Llama-3-8B layers (<= ``most``) the planner fits at ``seq_length`` in bf16 and FP8; 0 if none."""
    for layers in range(most, 0, -1):
        if all(planner_estimate(layers, seq_length, precision, memory_gb)[0] for precision in ("bf16", "fp8")):
            return layers
    return 0


def _samples(seq_length: int, count: int) -> list:
    lengths = [cases.document_lengths(seq_length, seed=100 + i, median=DOCUMENT_MEDIAN) for i in range(count)]
    return [cases.synthetic_samples([sample], 128256, seed=200 + i)[0] for i, sample in enumerate(lengths)]


def _measure(ctx, fp8, layers: int) -> dict:
    from megalong.model import preset_config

    options = ctx.options
    seq = options.figures_seq_length
    model = preset_config("llama3-8b", num_layers=layers, max_position_embeddings=seq, params_dtype="bf16",
                          transformer_impl="transformer_engine", attention_backend="te", fp8=fp8)
    steps = options.figures_warmup + options.figures_steps
    run = training.run_config(model, seq_length=seq, steps=steps + 1, global_batch=1, micro_batch=1, lr=1e-5,
                              initial_weights=None, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    samples = _samples(seq, steps)
    torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = training.start_trainer(run, ctx.runtime, samples)
        metrics = [trainer.train_step(step) for step in range(steps)]
    finally:
        del trainer
    measured = metrics[options.figures_warmup:]
    seconds = statistics.median(m.step_time for m in measured)
    flops = statistics.median(m.flops for m in measured)
    figures = {
        "layers": layers, "seq_length": seq, "precision": "fp8" if fp8 else "bf16",
        "step_seconds": seconds, "tokens_per_s": seq / seconds, "tflops_per_gpu": flops / seconds / 1e12,
        "losses": [m.loss for m in metrics],
        "attention_flop_share_of_full_causal": sum(s.attention_cost for s in samples) / (len(samples) * seq * seq),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    training.free_gpu_memory()
    return figures


def _layers(ctx) -> int:
    if ctx.options.figures_layers:
        return ctx.options.figures_layers
    total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    return layers_that_fit(total_gb, ctx.options.figures_seq_length)


def _run(ctx, precision: str) -> CheckResult:
    from megalong.model.config import FP8Config
    from megalong.training.metrics import detect_peak_tflops

    name = f"figures.{precision}"
    fp8 = FP8Config() if precision == "fp8" else None
    layers = ctx.shared.get("figures-layers") or _layers(ctx)
    if layers < 1:
        return CheckResult(name, "failed", "the planner fits no Llama-3-8B layer at this length on this GPU")
    attempts = []
    while True:
        out_of_memory = None
        try:
            figures = _measure(ctx, fp8, layers)
        except torch.cuda.OutOfMemoryError as err:
            out_of_memory = str(err).splitlines()[0]
        if out_of_memory is None:
            break
        training.free_gpu_memory()  # here, once the exception (and the frames it holds) is gone
        attempts.append({"layers": layers, "error": out_of_memory})
        if len(attempts) > MAX_RETRIES or layers == 1:
            return CheckResult(name, "failed", f"out of GPU memory down to {layers} layer(s)", {"attempts": attempts})
        layers -= 1
    ctx.shared["figures-layers"] = layers  # the other precision uses the same model
    memory_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    _, estimate = planner_estimate(layers, figures["seq_length"], precision, memory_gb, ctx.machine.gpu_name)
    peak = detect_peak_tflops(True)
    mfu = figures["tflops_per_gpu"] / peak if peak else None
    figures.update(out_of_memory_attempts=attempts, planner_predicted_gib=estimate.total / 2**30,
                   bf16_dense_peak_tflops=peak, mfu=mfu, gpu=ctx.machine.gpu_name)
    bf16 = ctx.shared.get("figures-bf16")
    if bf16 and precision == "fp8" and bf16["layers"] == layers:
        figures["speedup_over_bf16"] = figures["tokens_per_s"] / bf16["tokens_per_s"]
    ctx.shared[f"figures-{precision}"] = figures
    failures = []
    if not all(math.isfinite(x) for x in figures["losses"]):
        failures.append(f"non-finite loss: {figures['losses']}")
    if mfu is not None and not 0 < mfu <= 1:
        failures.append(f"MFU {mfu:.1%} is outside (0, 100%]: the FLOP count or the step time is wrong")
    summary = (f"{layers} layers at {figures['seq_length']:,} tokens: {figures['tokens_per_s']:,.0f} tokens/s, "
               f"{figures['tflops_per_gpu']:.0f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu is not None else
                                                             " (no known BF16 peak for this GPU: no MFU)")
               + f", peak {figures['peak_allocated_gib']:.1f} GiB allocated (planner: {figures['planner_predicted_gib']:.1f})")
    return CheckResult.judged(name, failures, figures, summary)


def check_bf16(ctx) -> CheckResult:
    return _run(ctx, "bf16")


def check_fp8(ctx) -> CheckResult:
    return _run(ctx, "fp8")
