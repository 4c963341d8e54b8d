"""A new stage keeps the weights it starts from: megalong's Trainer, seeded apart from the
initial weights it loads (``init.weights`` without optimizer state), through its first step.

Every real megalong run is bf16, and its optimizer keeps fp32 master weights made when it was
built, before the load; unless the load refreshes them, the first step puts the trainer's own
random initialisation back and the run trains from scratch with nothing in its log to say so
(megalong.training.checkpoint.load_checkpoint). megalong's warm-up starts at learning rate 0,
so after the first step every weight must be bit for bit what was loaded
(megalong.gpucheck.training.first_step_changes).

Run as training runs: bf16 parameters, the distributed optimizer, Transformer Engine's layers
on a GPU (and the same again with FP8, delayed scaling, where this GPU runs it), Megatron-Core's
local layers on the CPU (``--allow-no-gpu``). The training checks (``fp8.*``, ``tp-cp.training``)
apply the same criterion to their own first steps.
"""

from __future__ import annotations

from megalong.gpucheck import cases, runs, training
from megalong.gpucheck.records import CheckResult

SEQ_LENGTH = 512  # a multiple of 16: TE's FP8 GEMMs need token counts divisible by 16
STEPS = 2  # one warm-up step (learning rate 0 at the first), as megalong's schedules start


def _model(ctx, fp8=None):
    impl = "transformer_engine" if ctx.on_gpu and ctx.machine.missing("te") is None else "local"
    return cases.model_config(cases.MODEL, transformer_impl=impl, params_dtype="bf16", attention_backend="sdpa",
                              fp8=fp8)


def first_step_failures(ctx, fp8=None) -> tuple[list[str], dict]:
    """(failures, figures) of one stage started from initial weights: saved from a model
    seeded with runs.SEED, loaded by a Trainer seeded with training.TRAINER_SEED."""
    model = _model(ctx, fp8)
    initial = _model(ctx)  # the weights are written without FP8, as a converted or bf16 stage's are
    chunks = runs.build(initial, ctx)
    directory = str(runs.save_fresh(chunks, ctx.work_dir / f"initial-weights-{'fp8' if fp8 else 'bf16'}", initial))
    del chunks
    loaded = training.loaded_weights(model, None, directory, ctx)
    samples = cases.synthetic_samples(cases.micro_batch_lengths(SEQ_LENGTH)[:1], cases.MODEL.vocab_size, seed=13)
    run = training.run_config(model, seq_length=SEQ_LENGTH, steps=STEPS, global_batch=1, micro_batch=1, lr=1e-3,
                              initial_weights=directory, warmup_steps=1, device=ctx.device.type)
    trainer = training.start_trainer(run, ctx.runtime, samples)
    try:
        metrics = trainer.train_step(0)
        failures = training.first_step_changes(trainer, metrics, loaded)
    finally:
        del trainer
        training.free_gpu_memory()
    figures = {"layers": model.transformer_impl, "params_dtype": "bf16", "fp8": fp8.recipe if fp8 else None,
               "distributed_optimizer": run.parallel.distributed_optimizer, "first_step_lr": metrics.lr,
               "first_step_loss": metrics.loss, "parameters": len(loaded),
               "trainer_seed": run.seed, "initial_weights_seed": runs.SEED}
    return failures, figures


def check_initial_weights(ctx) -> CheckResult:
    from megalong.model.config import FP8Config

    failures, figures = first_step_failures(ctx)
    figures = {"bf16": figures}
    done = ["bf16"]
    fp8_missing = ctx.machine.missing("fp8")
    if fp8_missing is None:
        fp8_failures, figures["fp8"] = first_step_failures(ctx, FP8Config())
        failures += [f"FP8: {failure}" for failure in fp8_failures]
        done.append("FP8 (delayed scaling)")
    else:
        figures["fp8_not_checked"] = fp8_missing
    layers = figures["bf16"]["layers"]
    return CheckResult.judged(
        "training.initial-weights", failures, figures,
        f"{' and '.join(done)} with {'Transformer Engine' if layers == 'transformer_engine' else 'local'} layers: "
        f"after the first step (learning rate 0) all {figures['bf16']['parameters']} parameters are bit for bit the "
        f"loaded initial weights (trainer seeded {training.TRAINER_SEED}, weights written from seed {runs.SEED})"
        + ("" if fp8_missing is None else f"; FP8 not checked: {fp8_missing}"))
