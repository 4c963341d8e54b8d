"""TP=2 x CP=2 with sequence parallelism (x DP=2 on 8 GPUs) against TP=1 x CP=1 (every rank
data-parallel), through megalong's Trainer (Megatron DDP, gradients reduced as in training),
Transformer Engine layers and attention (ring), bf16, real text, the same initial weights and
the same global batches.

1. Gradients of the first step. Each layout runs one Trainer step with learning rate 0 and no
   clipping (the weights stay, Megatron's DDP leaves the reduced gradients in ``main_grad``);
   the Trainer is seeded apart from the initial weights, and after that step every weight
   must still be bit for bit the loaded one (training.first_step_changes).
   The TP x CP gradients go through a checkpoint (copied into the weights and saved), which
   puts them in the TP=1 layout, and are compared parameter by parameter with the
   reference's: both are bf16 computations within tolerances.bf16_gradient_bound of exact
   (TP and CP roundings counted), plus the bf16 rounding of the copy, so they differ by at
   most the sum. A sequence-parallel norm gradient left unreduced, a CP shard of the wrong
   tokens or a reduction over the wrong group is off by far more.
2. A few training steps. Losses must stay within tolerances.training_loss_bound of the
   reference's: a loose bound (the loss is compared relative to itself), which catches
   divergence, not subtle errors; part 1 is the sharp comparison.
"""

from __future__ import annotations

import math

import torch

from megalong.gpucheck import cases, runs, training
from megalong.gpucheck.compare import checkpoint_name, compare_gradients
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import U_BF16, bf16_forward_bound, bf16_gradient_bound, training_loss_bound

SEQ_LENGTH, LR = 4096, 1e-3
# The whole-model shape with the real Llama-3 vocabulary, so the loss moves on real text.
MODEL = cases.model_config(cases.MODEL, vocab_size=128256, transformer_impl="transformer_engine",
                           params_dtype="bf16", attention_backend="te", cp_comm="ring")
CANDIDATE = {"tensor_parallel": 2, "context_parallel": 2, "sequence_parallel": True}


def _trainer(ctx, parallel: dict, initial: str, samples: list, steps: int, lr: float, clip_grad: float,
             keep_loaded: bool = False):
    """A Trainer at ``parallel`` (no distributed optimizer: every rank keeps whole gradients),
    and with ``keep_loaded`` this rank's share of the initial weights as it must hold them
    before the first step (training.loaded_weights), else None."""
    from megalong.config.parallel import ParallelConfig

    parallel = {**parallel, "distributed_optimizer": False}
    run = training.run_config(MODEL, seq_length=SEQ_LENGTH, steps=steps, global_batch=ctx.world_size,
                              micro_batch=1, lr=lr, initial_weights=initial, parallel=parallel,
                              warmup_steps=0, decay="constant", clip_grad=clip_grad)
    runtime = ctx.use_layout(ParallelConfig(**parallel))
    loaded = training.loaded_weights(MODEL, run.parallel, initial, ctx) if keep_loaded else None
    return training.start_trainer(run, runtime, samples), loaded


def _first_step_gradients(ctx, parallel: dict, initial: str, samples: list, save_to=None) -> tuple[float, dict, list]:
    """(loss, gradients by checkpoint name, failures) of step 1 at ``parallel``, at learning
    rate 0: the initial weights must come through it unchanged (training.first_step_changes).
    With ``save_to``, the gradients are saved instead as a checkpoint (copied into the
    weights), which any layout reads, and none are returned."""
    from megalong.config.parallel import ParallelConfig
    from megalong.training.checkpoint import unwrap

    trainer, loaded = _trainer(ctx, parallel, initial, samples, steps=1, lr=0.0, clip_grad=0.0, keep_loaded=True)
    try:
        metrics = trainer.train_step(0)
        failures = training.first_step_changes(trainer, metrics, loaded)
        grads = {}
        if save_to is None:
            grads = training.main_gradients(trainer)
        else:
            chunks = [unwrap(chunk) for chunk in trainer.model]
            with torch.no_grad():
                for param in chunks[0].parameters():
                    param.copy_(param.main_grad)
            runs.save_fresh(chunks, save_to, MODEL)
    finally:
        del trainer
        training.free_gpu_memory()
        ctx.use_layout(ParallelConfig())
    return metrics.loss, grads, failures


def _losses(ctx, parallel: dict, initial: str, samples: list, steps: int) -> list[float]:
    from megalong.config.parallel import ParallelConfig

    trainer, _ = _trainer(ctx, parallel, initial, samples, steps, LR, clip_grad=1.0)
    try:
        return [trainer.train_step(step).loss for step in range(steps)]
    finally:
        del trainer
        training.free_gpu_memory()
        ctx.use_layout(ParallelConfig())


def check_training(ctx) -> CheckResult:
    from megalong.checkpoint.weights import load_weights

    steps = 3 if ctx.options.quick else 4
    documents = cases.text_documents(steps * ctx.world_size * SEQ_LENGTH + 1)
    samples = cases.text_samples(documents, SEQ_LENGTH, 0, steps * ctx.world_size)
    chunks = runs.build(MODEL, ctx)
    initial = str(runs.save_fresh(chunks, ctx.work_dir / "tp-cp-initial", MODEL))
    del chunks
    training.free_gpu_memory()

    # 1. Gradients of step 1, the candidate's brought to the TP=1 layout through a checkpoint.
    reference_loss, reference_grads, reference_failures = _first_step_gradients(ctx, {}, initial, samples)
    gradient_dir = ctx.work_dir / "tp-cp-gradients"
    loss, _, candidate_failures = _first_step_gradients(ctx, CANDIDATE, initial, samples, save_to=gradient_dir)
    chunks = runs.build(MODEL, ctx, seed=runs.SEED + 1)
    load_weights(chunks, gradient_dir)
    candidate_grads = {checkpoint_name(n): p.detach().float().cpu() for n, p in chunks[0].named_parameters()}
    del chunks
    training.free_gpu_memory()
    layers = MODEL.num_layers
    # Both layouts within bf16_gradient_bound of exact; the copy into bf16 weights rounds once more.
    gradient_bound = bf16_gradient_bound(layers) + bf16_gradient_bound(layers, cp=2, tp=2) + U_BF16
    grad_figures, failures = compare_gradients(candidate_grads, reference_grads, gradient_bound)
    failures += [f"TP=1: {f}" for f in reference_failures] + [f"TP=2 x CP=2: {f}" for f in candidate_failures]

    # 2. Losses over a few training steps.
    reference = _losses(ctx, {}, initial, samples, steps)
    candidate = _losses(ctx, CANDIDATE, initial, samples, steps)
    forward = bf16_forward_bound(layers, cp=2, tp=2)
    gradient = bf16_gradient_bound(layers, cp=2, tp=2)
    bounds = []
    for step, (got, ref) in enumerate(zip(candidate, reference), start=1):
        bound = training_loss_bound(forward, gradient, reference[0], ref)
        bounds.append(bound)
        if not abs(got - ref) <= bound:
            failures.append(f"step {step}: loss {got:.5f} at TP=2 x CP=2 vs {ref:.5f} at TP=1 "
                            f"(difference {abs(got - ref):.3g} > bound {bound:.3g})")
    if not all(math.isfinite(x) for x in candidate):
        failures.append(f"non-finite losses at TP=2 x CP=2: {candidate}")
    figures = {"layout": {**CANDIDATE, "data_parallel": ctx.world_size // 4}, "reference_layout": "TP=1 CP=1",
               "trainer_seed": training.TRAINER_SEED, "initial_weights_seed": runs.SEED,
               "steps": steps, "seq_length": SEQ_LENGTH, "global_batch": ctx.world_size, "lr": LR,
               "first_step_loss": loss, "first_step_reference_loss": reference_loss,
               "losses": candidate, "reference_losses": reference, "loss_bounds": bounds, **grad_figures}
    return CheckResult.judged(
        "tp-cp.training", failures, figures,
        f"step-1 gradients at TP=2 x CP=2 x SP within {gradient_bound:.1e} of TP=1's (worst "
        f"{grad_figures['gradient_worst_relative_error']:.1e}); the initial weights survived both layouts' first "
        f"step; {steps} steps: losses "
        f"{', '.join(f'{x:.4f}' for x in candidate)} vs {', '.join(f'{x:.4f}' for x in reference)}")
