"""FP8 (Transformer Engine, through Megatron-Core's FP8 recipes) against bf16, by what FP8 can
get wrong: the gradients it computes, and where training on real text takes the loss.

The loss at initialisation is about ln(vocabulary) whatever the layers compute, so it is
never compared. Instead:

1. Gradients, as a training step computes them: megalong's Trainer (Megatron-Core's
   schedule, DDP, distributed optimizer) from the same initial weights in bf16 and in FP8, at
   learning rate 0 (the weights stay), every step on the same micro-batch. The schedule
   re-quantizes TE's FP8 weights at each step's first micro-batch with the current scales
   (``set_is_first_microbatch``); delayed scaling updates those scales from past steps' amax
   when each step's forward ends. FP8 runs two warm-up steps, then the one compared; every
   parameter's gradient (DDP's reduced ``main_grad``) must be within the FP8 gradient bound
   of bf16's (relative error; tolerances.fp8_gradient_bound). A stale, transposed or missing
   scale changes a gradient by a factor; a saturated or underflowed tensor changes its
   direction. (A forward run by hand outside the schedule would reuse FP8 weights quantized
   at the initial scale 1.0: compared, that is not what training computes.)
2. Training. Both train ``fp8_steps`` steps through the Trainer on Python standard-library
   source in Llama-3 tokens, from the same initial weights; the loss on held-out files
   (other files than the training ones) must fall by the same amount to within e of bf16's
   fall (tolerances.training_loss_bound's first-order argument, with FP8's gradient bound: an
   update from gradients within e of bf16's moves the loss by the same amount to within e).
   bf16 must itself have learned, or there is nothing to compare with.
3. The initial weights. Every one of these runs is seeded apart from the initial weights it
   loads, and its first step (the warm-up's, at learning rate 0) must leave them bit for bit
   as loaded, in bf16 and in FP8 (megalong.gpucheck.training.first_step_changes).
"""

from __future__ import annotations

import math

from megalong.gpucheck import cases, runs, training
from megalong.gpucheck.compare import compare_gradients
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import fp8_gradient_bound

SEQ_LENGTH, MICRO_BATCH, HELDOUT_SAMPLES = 2048, 2, 4
LR = 1e-3
LAYERS = cases.FP8_MODEL.num_layers


def _bf16_config():
    return cases.model_config(cases.FP8_MODEL, transformer_impl="transformer_engine", params_dtype="bf16",
                              attention_backend="te")


def _data(ctx) -> dict:
    """Training samples from the first files, held-out samples from the last ones."""

    def compute():
        steps = ctx.options.fp8_steps
        heldout_tokens = HELDOUT_SAMPLES * SEQ_LENGTH + 1
        documents = cases.text_documents((steps * MICRO_BATCH + 1) * SEQ_LENGTH + heldout_tokens + 50_000)
        split, tail = len(documents), 0
        while tail < heldout_tokens:
            split -= 1
            tail += documents[split].size
        train = cases.text_samples(documents[:split], SEQ_LENGTH, 0, steps * MICRO_BATCH)
        heldout = cases.text_samples(documents[split:], SEQ_LENGTH, 0, HELDOUT_SAMPLES)
        return {"train": train, "heldout": heldout, "train_files": split, "heldout_files": len(documents) - split}

    return ctx.cached("fp8-data", compute)


def _initial_weights(ctx) -> str:
    def compute():
        config = _bf16_config()
        chunks = runs.build(config, ctx)
        directory = runs.save_fresh(chunks, ctx.work_dir / "fp8-initial", config)
        del chunks
        training.free_gpu_memory()
        return str(directory)

    return ctx.cached("fp8-initial-weights", compute)


def _loaded(ctx) -> dict:
    """The initial weights as every run here must hold them before its first step."""
    return ctx.cached("fp8-initial-loaded",
                      lambda: training.loaded_weights(_bf16_config(), None, _initial_weights(ctx), ctx))


def _gradients(ctx, fp8) -> dict:
    """Step gradients at learning rate 0 through the Trainer, the same micro-batch every step:
    bf16 one step, FP8 two warm-up steps (delayed scaling's history) and the one compared."""
    steps = 3 if fp8 is not None else 1
    run = training.run_config(cases.model_config(_bf16_config(), fp8=fp8), seq_length=SEQ_LENGTH, steps=steps,
                              global_batch=MICRO_BATCH, micro_batch=MICRO_BATCH, lr=0.0,
                              initial_weights=_initial_weights(ctx), warmup_steps=0, decay="constant", clip_grad=0.0)
    loaded = _loaded(ctx)
    trainer = training.start_trainer(run, ctx.runtime, _data(ctx)["train"][:MICRO_BATCH])
    metrics = [trainer.train_step(0)]
    failures = training.first_step_changes(trainer, metrics[0], loaded)
    metrics += [trainer.train_step(step) for step in range(1, steps)]
    grads = training.main_gradients(trainer)
    del trainer
    training.free_gpu_memory()
    return {"loss": metrics[-1].loss, "grads": grads, "failures": failures}


def train(ctx, fp8, save_as: str | None = None) -> dict:
    """``fp8_steps`` Trainer steps from the shared initial weights; held-out loss before and
    after, and whether the first step (the warm-up's, at learning rate 0) kept the weights."""
    data = _data(ctx)
    config = cases.model_config(_bf16_config(), fp8=fp8)
    run = training.run_config(config, seq_length=SEQ_LENGTH, steps=ctx.options.fp8_steps,
                              global_batch=MICRO_BATCH, micro_batch=MICRO_BATCH, lr=LR,
                              initial_weights=_initial_weights(ctx))
    loaded = _loaded(ctx)
    trainer = training.start_trainer(run, ctx.runtime, data["train"])
    heldout = [runs.micro_batch(data["heldout"][i:i + MICRO_BATCH], ctx) for i in range(0, HELDOUT_SAMPLES, MICRO_BATCH)]
    model = trainer.model[0]
    initial = training.mean_loss(model, heldout)
    metrics = [trainer.train_step(0)]
    failures = training.first_step_changes(trainer, metrics[0], loaded)
    metrics += [trainer.train_step(step) for step in range(1, ctx.options.fp8_steps)]
    final = training.mean_loss(model, heldout)
    saved = None
    if save_as:
        from megalong.training.checkpoint import unwrap

        chunks = [unwrap(chunk) for chunk in trainer.model]  # the models inside Megatron's DDP
        saved = str(runs.save_fresh(chunks, ctx.work_dir / save_as, trainer.model_config))
    del trainer, model
    training.free_gpu_memory()
    return {"heldout_initial": initial, "heldout_final": final, "train_losses": [m.loss for m in metrics],
            "saved": saved, "failures": failures}


def baseline(ctx) -> dict:
    return ctx.cached("fp8-bf16-baseline", lambda: {"grads": _gradients(ctx, None), "training": train(ctx, None)})


def trained_fp8(ctx, recipe: str) -> dict:
    """The FP8 run of ``recipe`` (delayed's weights are saved for the eval check)."""
    from megalong.model.config import FP8Config

    save_as = "fp8-delayed-trained" if recipe == "delayed" else None
    return ctx.cached(f"fp8-{recipe}-training", lambda: train(ctx, FP8Config(recipe=recipe), save_as))


def _check(ctx, recipe: str) -> CheckResult:
    from megalong.model.config import FP8Config

    name = f"fp8.{recipe}"
    fp8 = FP8Config(recipe=recipe)
    base = baseline(ctx)
    bound = fp8_gradient_bound(LAYERS, fp8.format)
    grads = _gradients(ctx, fp8)
    grad_figures, failures = compare_gradients(grads["grads"], base["grads"]["grads"], bound)
    ours, theirs = trained_fp8(ctx, recipe), base["training"]
    # The initial weights through the first step: bf16's runs and this recipe's.
    for label, found in (("bf16 gradient run", base["grads"]), ("bf16 training", theirs),
                         (f"FP8 {recipe} gradient run", grads), (f"FP8 {recipe} training", ours)):
        failures += [f"{label}: {failure}" for failure in found["failures"]]

    fell_bf16 = theirs["heldout_initial"] - theirs["heldout_final"]
    fell_fp8 = ours["heldout_initial"] - ours["heldout_final"]
    if not all(math.isfinite(x) for x in (*ours["train_losses"], ours["heldout_final"])):
        failures.append(f"FP8 training produced a non-finite loss: {ours['train_losses'][-3:]}, "
                        f"held-out {ours['heldout_final']}")
    if not fell_bf16 > 0:
        failures.append(f"bf16 did not learn (held-out loss {theirs['heldout_initial']:.3f} -> "
                        f"{theirs['heldout_final']:.3f}): nothing to compare FP8 with")
    elif not abs(fell_fp8 - fell_bf16) <= bound * fell_bf16:
        failures.append(f"held-out loss fell by {fell_fp8:.3f} with FP8 and {fell_bf16:.3f} with bf16: "
                        f"differs by more than {bound:.2f} of bf16's fall")
    data = _data(ctx)
    figures = {
        "recipe": recipe, "format": fp8.format, "layers": LAYERS, "vocab_size": cases.FP8_MODEL.vocab_size,
        "tokens_per_step": MICRO_BATCH * SEQ_LENGTH, "steps": ctx.options.fp8_steps, "lr": LR,
        "trainer_seed": training.TRAINER_SEED, "initial_weights_seed": runs.SEED,
        "train_files": data["train_files"], "heldout_files": data["heldout_files"],
        "gradient_step_losses": {"bf16": base["grads"]["loss"], "fp8": grads["loss"]},
        "bf16_heldout": [theirs["heldout_initial"], theirs["heldout_final"]],
        "fp8_heldout": [ours["heldout_initial"], ours["heldout_final"]],
        "bf16_train_losses": theirs["train_losses"], "fp8_train_losses": ours["train_losses"],
        "loss_fall_bound": bound, **grad_figures,
    }
    return CheckResult.judged(
        name, failures, figures,
        f"every step gradient within {bound:.2f} of bf16's (worst {grad_figures['gradient_worst_relative_error']:.3f}); "
        f"held-out loss {ours['heldout_initial']:.2f} -> {ours['heldout_final']:.2f} in {ctx.options.fp8_steps} steps "
        f"(bf16: {theirs['heldout_initial']:.2f} -> {theirs['heldout_final']:.2f}); the initial weights survived "
        f"every run's first step (bf16 and FP8)")


def check_delayed(ctx) -> CheckResult:
    return _check(ctx, "delayed")


def check_tensorwise(ctx) -> CheckResult:
    return _check(ctx, "tensorwise")
